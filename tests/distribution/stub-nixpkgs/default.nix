# A stand-in for the nixpkgs flake input, to evaluate flake.nix offline (Debian's Nix 2.8 can
# neither fetch nixpkgs nor build anything here).
#
# It provides only the names flake.nix may use, each shaped like the real one: a name the
# flake misspells, or one that nixpkgs lacks, fails the evaluation with "attribute missing".
# Derivations are plain attribute sets with an outPath; builders check the arguments they are
# given and keep them in `stubArgs`, so that the test can assert on them.
let
  # --- lib: real implementations of the few functions used ------------------------------
  lib = {
    genAttrs = names: f: builtins.listToAttrs (map (n: { name = n; value = f n; }) names);
    optional = cond: x: if cond then [ x ] else [ ];
    makeBinPath = ps: builtins.concatStringsSep ":" (map (p: "${p}/bin") ps);
    importTOML = path: builtins.fromTOML (builtins.readFile path);
    fileset = {
      unions =
        paths:
        map (p: if builtins.pathExists p then p else throw "lib.fileset: ${toString p} is missing") paths;
      toSource =
        { root, fileset }:
        assert builtins.isList fileset;
        {
          outPath = "/nix/store/stub-source";
          stubRoot = toString root;
          stubFiles = map toString fileset;
        };
    };
    licenses.mit = {
      spdxId = "MIT";
    };
    platforms.linux = [
      "x86_64-linux"
      "aarch64-linux"
    ];
  };

  isDrv = x: builtins.isAttrs x && x ? outPath;
  checkDrvs =
    what: xs:
    assert builtins.isList xs || throw "${what} must be a list";
    builtins.all (x: isDrv x || throw "${what}: an element is not a derivation") xs;
  drv = name: extra: { inherit name; outPath = "/nix/store/stub-${name}"; } // extra;

  # --- Python ------------------------------------------------------------------------------
  pyNames = [
    "anyio" "authlib" "build" "certifi" "cyclopts" "exceptiongroup" "fastmcp" "fastmcp-slim"
    "griffelib" "h11" "hatchling" "httpcore2" "httpx2" "idna" "joserfc" "jsonref" "jsonschema"
    "jsonschema-path" "mcp" "mcp-types" "openapi-pydantic" "opentelemetry-api" "packaging"
    "pip" "platformdirs" "prometheus-client" "py-key-value-aio" "pydantic" "pydantic-settings"
    "pyjwt" "pyperclip" "pytest" "pytest-asyncio" "python-dotenv" "python-multipart" "pyyaml"
    "rich" "sse-starlette" "starlette" "structlog" "truststore" "typing-extensions"
    "typing-inspection" "uncalled-for" "uvicorn" "watchfiles" "websockets"
  ];
  optionalDeps = {
    pydantic.email = [ "email-validator" ];
    pyjwt.crypto = [ "cryptography" ];
    py-key-value-aio = {
      filetree = [ "aiofile" ];
      keyring = [ "keyring" ];
      memory = [ "cachetools" ];
    };
  };
  pyPkg =
    name:
    drv "python3.13-${name}" {
      pname = name;
      optional-dependencies = builtins.mapAttrs (
        _: deps: map (d: drv "python3.13-${d}" { pname = d; }) deps
      ) (optionalDeps.${name} or { });
    };

  buildPython =
    kind: args:
    assert args ? pname || throw "${kind}: pname missing";
    assert args ? version || throw "${kind} ${args.pname}: version missing";
    assert args ? src || throw "${kind} ${args.pname}: src missing";
    assert (args ? pyproject || args ? format) || throw "${kind} ${args.pname}: pyproject or format";
    # As in nixpkgs: Python builds derive doInstallCheck from doCheck (and ignore a given one).
    assert !(args ? doInstallCheck) || throw "${args.pname}: doInstallCheck is ignored, use doCheck";
    assert !(args ? installCheckPhase) || (args.doCheck or true) || throw "${args.pname}: doCheck = false skips installCheckPhase";
    assert checkDrvs "${args.pname}: dependencies" (args.dependencies or [ ]);
    assert checkDrvs "${args.pname}: build-system" (args.build-system or [ ]);
    drv "python3.13-${args.pname}-${args.version}" {
      inherit (args) pname version;
      stubKind = kind;
      stubArgs = args;
    };

  basePythonPackages = final: builtins.listToAttrs (map (n: { name = n; value = pyPkg n; }) pyNames) // {
    buildPythonPackage = buildPython "buildPythonPackage";
    buildPythonApplication = buildPython "buildPythonApplication";
  };

  mkPython =
    packageOverrides:
    let
      pkgs = let
        base = basePythonPackages pkgs;
      in base // packageOverrides pkgs base;
    in
    drv "python3-3.13" {
      inherit pkgs;
      withPackages =
        f:
        let
          ps = f pkgs;
        in
        assert checkDrvs "withPackages" ps;
        drv "python3-3.13-env" { stubPackages = map (p: p.pname) ps; };
      override =
        {
          self ? null,
          packageOverrides ? (_: _: { }),
        }:
        mkPython packageOverrides;
    };

  # --- pkgs ----------------------------------------------------------------------------------
  pkgsFor = system: {
    stdenv.hostPlatform.system = system;
    runtimeShell = "/nix/store/stub-bash/bin/bash";
    python3 = mkPython (_: _: { });
    podman = drv "podman-5" { };
    uv = drv "uv" { };
    ruff = drv "ruff" { };
    nixfmt = drv "nixfmt" { };
    fetchurl =
      { url, hash, ... }@args:
      assert builtins.substring 0 7 hash == "sha256-" || throw "fetchurl ${url}: hash must be SRI sha256";
      drv (baseNameOf url) { stubArgs = args; };
    runCommand =
      name: env: script:
      assert builtins.isString script;
      drv name { stubScript = script; };
    mkShell =
      args:
      assert checkDrvs "mkShell packages" (args.packages or [ ]);
      drv "nix-shell" { stubArgs = args; };
  };
in
{
  inherit lib;
  legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] pkgsFor;
}
