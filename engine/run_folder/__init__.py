"""What a run folder holds on disk: checkpoint folders, their completeness markers, ``latest``,
retention, and moving a run aside. Read by the loop, by the tools (export, evaluation) and by the
checks before launch; it imports nothing from them."""
