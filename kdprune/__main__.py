import sys

from kdprune.cli import main

sys.exit(main())
