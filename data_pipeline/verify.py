"""``python -m data_pipeline.verify``: the documented command (``data_pipeline.shards.verify``)."""

import sys

from data_pipeline.shards.verify import main

if __name__ == "__main__":
    sys.exit(main())
