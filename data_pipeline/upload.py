"""``python -m data_pipeline.upload``: the documented command (``data_pipeline.shards.upload``)."""

import sys

from data_pipeline.shards.upload import main

if __name__ == "__main__":
    sys.exit(main())
