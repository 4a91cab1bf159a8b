import sys

from neuroal.cli import main

sys.exit(main())
