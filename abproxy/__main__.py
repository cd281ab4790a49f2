import sys

from abproxy.cli import main

if __name__ == "__main__":  # not when a child process (MLflow's trace writer) imports it again
    sys.exit(main())
