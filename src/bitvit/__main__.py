import sys

from bitvit.cli import main

sys.exit(main())
