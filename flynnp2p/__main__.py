import sys

from flynnp2p.cli.main import main

sys.exit(main())
