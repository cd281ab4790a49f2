import sys

from abproxy.cli import main

sys.exit(main())
