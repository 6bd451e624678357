import sys

from bnfold.cli import main

sys.exit(main())
