"""Turn a multirun folder into one table:  python report.py outputs/train/multirun/<date>/<time>"""

import sys

from vaelab.report import main

if __name__ == "__main__":
    sys.exit(main())
