# Evaluates flake.nix's outputs against the stub nixpkgs, and returns what the test checks.
#   nix-instantiate --eval --strict --json tests/distribution/eval-flake.nix
{
  flakeFile ? ../../flake.nix,
  system ? "x86_64-linux",
}:
let
  flake = import flakeFile;
  nixpkgs = import ./stub-nixpkgs;
  self = outputs // { outPath = toString (dirOf flakeFile); };
  outputs = flake.outputs { inherit self nixpkgs; };
  pkg = outputs.packages.${system}.default;
  python = pkg.stubArgs;
  # Every Python package the application depends on, directly or not.
  closure = builtins.genericClosure {
    startSet = map (d: { key = d.pname; drv = d; }) pkg.stubArgs.dependencies;
    operator =
      item: map (d: { key = d.pname; drv = d; }) (item.drv.stubArgs.dependencies or [ ]);
  };
  # Those the flake builds itself (the pinned PyPI wheels), not taken from nixpkgs.
  built = builtins.filter (item: item.drv ? stubArgs) closure;
in
{
  description = flake.description;
  nixpkgsUrl = flake.inputs.nixpkgs.url;
  outputNames = builtins.attrNames outputs;
  systems = builtins.attrNames outputs.packages;
  package = {
    inherit (pkg) pname version;
    kind = pkg.stubKind;
    pyproject = python.pyproject;
    buildSystem = map (d: d.pname) python.build-system;
    dependencies = map (d: d.pname) python.dependencies;
    makeWrapperArgs = python.makeWrapperArgs;
    srcFiles = python.src.stubFiles;
    installCheck = python.installCheckPhase;
  };
  sameDefault = outputs.packages.${system}.default == outputs.packages.${system}.pod_exec_mcp;
  apps = builtins.mapAttrs (_: a: { inherit (a) type program; }) outputs.apps.${system};
  devShell = {
    packages = map (p: p.name) outputs.devShells.${system}.default.stubArgs.packages;
    python = (builtins.head outputs.devShells.${system}.default.stubArgs.packages).stubPackages;
    shellHook = outputs.devShells.${system}.default.stubArgs.shellHook;
  };
  checks = builtins.mapAttrs (_: c: c.stubScript or c.name) outputs.checks.${system};
  formatter = outputs.formatter.${system}.name;
  # The pinned PyPI wheels, as the application's dependency closure holds them.
  wheels = builtins.listToAttrs (
    map (item: {
      name = item.key;
      value = {
        inherit (item.drv) version;
        format = item.drv.stubArgs.format;
        inherit (item.drv.stubArgs.src.stubArgs) url hash;
        dependencies = map (d: d.pname) item.drv.stubArgs.dependencies;
        importsCheck = item.drv.stubArgs.pythonImportsCheck;
      };
    }) built
  );
  closure = map (item: item.key) closure;
}
