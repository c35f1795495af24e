import sys

from scalespd.run import main

sys.exit(main())
