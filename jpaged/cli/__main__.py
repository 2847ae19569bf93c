import sys

from jpaged.cli.main import main

sys.exit(main())
