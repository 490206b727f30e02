import sys

from pod_exec_mcp.cli import main

sys.exit(main())
