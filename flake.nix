{
  description = "pod_exec_mcp: an MCP server that gives every agent session its own Podman sandbox";

  # nixpkgs pinned to one revision. No flake.lock ships yet: it cannot be written without
  # network access. Run `nix flake lock` once (it records this revision's narHash) and
  # commit the flake.lock it writes. See docs/install.md.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/07c354d927666f5adfb3baffdf675b62aa9c3009";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # Only what the package is built from: editing tests or docs rebuilds nothing.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./pyproject.toml
          ./README.md
          ./pod_exec_mcp
          ./image
        ];
      };
      # The version has one source, pod_exec_mcp/__init__.py, which hatch reads too. Matched
      # line by line: a `.*` across newlines in builtins.match is not portable.
      version =
        let
          lines = builtins.filter builtins.isString (
            builtins.split "\n" (builtins.readFile ./pod_exec_mcp/__init__.py)
          );
          found = builtins.filter (m: m != null) (map (builtins.match ''__version__ = "([^"]+)"'') lines);
        in
        assert builtins.length found == 1 || throw "pod_exec_mcp/__init__.py: no single __version__";
        builtins.head (builtins.head found);

      # The source plus the tests, for the lint check.
      lintSrc = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./pyproject.toml
          ./pod_exec_mcp
          ./tests
        ];
      };

      # pyproject.toml asks for fastmcp>=4.1.7,<5 (the suite passes on 4.1.7 and 4.2.3).
      # nixpkgs at the revision above packages fastmcp 4.0.10 (with mcp 2.2.0 and httpx2
      # 2.4.0), below that bound. So the fastmcp family comes from
      # PyPI here, at exactly the versions our test suite runs with, each file pinned by
      # its sha256 (PyPI's own digest). They are pure-Python wheels; the rest of the
      # dependency closure comes from nixpkgs. pythonRuntimeDepsCheckHook stops the build
      # if a nixpkgs version is below what these wheels declare: pin that one here too.
      pypiWheels = {
        fastmcp = {
          version = "4.2.3";
          url = "https://files.pythonhosted.org/packages/0f/58/822329b5537fa069605c2210a57b17e4ffba34d447698927662a6be11633/fastmcp-4.2.3-py3-none-any.whl";
          hash = "sha256-gv3lwdsqbYZQFXJrFVAqJlcgXkVJKV3BNX/LexxSGk0=";
        };
        fastmcp-slim = {
          version = "4.2.3";
          url = "https://files.pythonhosted.org/packages/20/19/9ff6c72fbb1775d1a23547d907edf84c3cb09eba7f2437e49d77a41177c9/fastmcp_slim-4.2.3-py3-none-any.whl";
          hash = "sha256-bWh2atGNWWYjDXIWweBwMl/8VHo8i8SRchdPbELqYX0=";
        };
        mcp = {
          version = "2.3.0";
          url = "https://files.pythonhosted.org/packages/20/d7/4a2878f128df729db3ca04e71bfce26405cc2e0c9ebe19c592feeb4c61b9/mcp-2.3.0-py3-none-any.whl";
          hash = "sha256-3QxEwInRZFPorjGjh3oAVNeiMUyqqB9eBUG5sXNLI3c=";
        };
        mcp-types = {
          version = "2.3.0";
          url = "https://files.pythonhosted.org/packages/ce/48/32583066b155bb5d4507e7887dc88ee23118cc4de8e2a12870c49719e2a8/mcp_types-2.3.0-py3-none-any.whl";
          hash = "sha256-lo79va7fqwatrkDTeKNDlfEJDFkh1L48nN4oOq922R0=";
        };
        httpx2 = {
          version = "2.16.2";
          url = "https://files.pythonhosted.org/packages/77/de/8c4306a3d6aa2495111986addf33a9e561eff4c47552e4c4b9251160d0ad/httpx2-2.16.2-py3-none-any.whl";
          hash = "sha256-8FwTqt5MRdvxyQYGR6EFjwrK1iOY+tludBJp7bM9RvU=";
        };
        httpcore2 = {
          version = "2.16.2";
          url = "https://files.pythonhosted.org/packages/2a/e8/009c347feac27f8960605aa98d55ed263b5870dd4fd80b82fd1d00d5716c/httpcore2-2.16.2-py3-none-any.whl";
          hash = "sha256-FgUa4qQvd2AHVD8y3pNJoxeyPSy7ThRWtLrA6IuHQZo=";
        };
      };

      # The Python package set with the fastmcp family replaced by the wheels above.
      pythonFor =
        pkgs:
        let
          wheel =
            ps: pname: importName: dependencies:
            ps.buildPythonPackage {
              inherit pname dependencies;
              inherit (pypiWheels.${pname}) version;
              format = "wheel";
              src = pkgs.fetchurl { inherit (pypiWheels.${pname}) url hash; };
              pythonImportsCheck = lib.optional (importName != null) importName;
            };
          python = pkgs.python3.override {
            self = python;
            packageOverrides = final: prev: {
              httpcore2 = wheel final "httpcore2" "httpcore2" [
                final.h11
                final.truststore
              ];
              httpx2 = wheel final "httpx2" "httpx2" [
                final.anyio
                final.httpcore2
                final.idna
                final.truststore
                final.typing-extensions
              ];
              mcp-types = wheel final "mcp-types" "mcp_types" [
                final.pydantic
                final.typing-extensions
              ];
              mcp = wheel final "mcp" "mcp" (
                [
                  final.anyio
                  final.httpx2
                  final.jsonschema
                  final.mcp-types
                  final.opentelemetry-api
                  final.pydantic
                  final.pyjwt
                  final.python-multipart
                  final.sse-starlette
                  final.starlette
                  final.typing-extensions
                  final.typing-inspection
                  final.uvicorn
                ]
                ++ final.pyjwt.optional-dependencies.crypto
              );
              fastmcp-slim = wheel final "fastmcp-slim" "fastmcp" (
                [
                  final.mcp-types
                  final.platformdirs
                  final.pydantic
                  final.pydantic-settings
                  final.python-dotenv
                  final.rich
                  final.typing-extensions
                  # its [client,server] extras
                  final.authlib
                  final.certifi
                  final.cyclopts
                  final.exceptiongroup
                  final.griffelib
                  final.httpx2
                  final.joserfc
                  final.jsonref
                  final.jsonschema
                  final.jsonschema-path
                  final.mcp
                  final.openapi-pydantic
                  final.opentelemetry-api
                  final.packaging
                  final.py-key-value-aio
                  final.pyperclip
                  final.python-multipart
                  final.pyyaml
                  final.starlette
                  final.uncalled-for
                  final.uvicorn
                  final.watchfiles
                  final.websockets
                ]
                ++ final.pydantic.optional-dependencies.email
                ++ final.py-key-value-aio.optional-dependencies.filetree
                ++ final.py-key-value-aio.optional-dependencies.memory
              );
              # A metapackage: fastmcp-slim with its client and server extras.
              fastmcp = wheel final "fastmcp" null [ final.fastmcp-slim ];
            };
          };
        in
        python;

      # pyproject.toml's [project] dependencies.
      appDependencies = ps: [
        ps.fastmcp
        ps.pydantic
        ps.platformdirs
        ps.structlog
        ps.prometheus-client
        ps.uvicorn
        ps.h11
      ];

      packageFor =
        pkgs:
        let
          python = pythonFor pkgs;
        in
        python.pkgs.buildPythonApplication {
          pname = "pod_exec_mcp";
          inherit version;
          pyproject = true;
          inherit src;

          build-system = [ python.pkgs.hatchling ];
          dependencies = appDependencies python.pkgs;

          # Podman is found on PATH. --suffix, not --prefix: a podman the user has earlier on
          # PATH (a newer one, or a wrapper) wins; this one is only the fallback.
          makeWrapperArgs = [
            "--suffix"
            "PATH"
            ":"
            (lib.makeBinPath [ pkgs.podman ])
          ];

          pythonImportsCheck = [
            "pod_exec_mcp"
            "pod_exec_mcp.cli"
          ];
          # Python builds check after installing (doCheck drives the installCheckPhase). The
          # test suite needs a working Podman, which the build sandbox lacks, so this phase
          # runs both commands instead; the checks below prove the rest that they can.
          doCheck = true;
          installCheckPhase = ''
            runHook preInstallCheck
            $out/bin/pod_exec_mcp --version
            $out/bin/pod_exec_mcp --help > /dev/null
            $out/bin/pod_exec_mcp_build --print-containerfile | grep -q '^FROM '
            runHook postInstallCheck
          '';

          meta = {
            description = "MCP server that gives every agent session its own Podman sandbox";
            license = lib.licenses.mit;
            platforms = lib.platforms.linux;
            mainProgram = "pod_exec_mcp";
          };
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        pod_exec_mcp = packageFor pkgs;
        default = pod_exec_mcp;
      });

      apps = forAllSystems (
        pkgs:
        let
          app = packageFor pkgs;
        in
        {
          # `nix run`: the server (pass its flags after `--`).
          default = {
            type = "app";
            program = "${app}/bin/pod_exec_mcp";
          };
          # `nix run .#build-image`: build the sandbox image with the packaged Containerfile.
          build-image = {
            type = "app";
            program = "${app}/bin/pod_exec_mcp_build";
          };
        }
      );

      devShells = forAllSystems (
        pkgs:
        let
          python = pythonFor pkgs;
          env = python.withPackages (
            ps:
            appDependencies ps
            ++ [
              ps.hatchling
              ps.build
              ps.pytest
              ps.pytest-asyncio
            ]
          );
        in
        {
          default = pkgs.mkShell {
            packages = [
              env
              pkgs.podman
              pkgs.uv
              pkgs.ruff
            ];
            # The working tree is importable as is: `python -m pod_exec_mcp` serves,
            # `python -m pod_exec_mcp.build` builds the sandbox image, `pytest` tests.
            shellHook = ''
              export PYTHONPATH="$PWD''${PYTHONPATH:+:$PYTHONPATH}"
            '';
          };
        }
      );

      checks = forAllSystems (
        pkgs:
        let
          app = packageFor pkgs;
        in
        {
          # Builds the package; its install check runs both commands.
          package = app;
          # `nix run` resolves to the server.
          app-is-the-server = pkgs.runCommand "pod_exec_mcp-app-check" { } ''
            test "${self.apps.${pkgs.stdenv.hostPlatform.system}.default.program}" = "${app}/bin/pod_exec_mcp"
            ${app}/bin/pod_exec_mcp --version > $out
          '';
          # The wrapper has Podman on PATH, yet a podman earlier on the user's PATH wins.
          podman-on-path = pkgs.runCommand "pod_exec_mcp-path-check" { } ''
            grep -q '${pkgs.podman}/bin' ${app}/bin/pod_exec_mcp
            mkdir -p fake
            printf '#!%s\ntouch "%s/fake-called"\necho "[]"\n' \
              '${pkgs.runtimeShell}' "$PWD" > fake/podman
            chmod +x fake/podman
            HOME="$PWD" PATH="$PWD/fake:$PATH" ${app}/bin/pod_exec_mcp --list-containers
            test -e fake-called
            touch $out
          '';
          lint = pkgs.runCommand "pod_exec_mcp-lint" { nativeBuildInputs = [ pkgs.ruff ]; } ''
            cd ${lintSrc}
            ruff check --no-cache .
            ruff format --no-cache --check .
            touch $out
          '';
        }
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
