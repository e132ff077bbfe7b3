import sys

from cloudnbd.cli import main

sys.exit(main())
