import sys

from medmap.cli import main

sys.exit(main())
