"""`python -m fastmoco train|bench ...`: the same entry as the `fastmoco` console script."""
from fastmoco.cli import main

main()
