"""``python -m defectscope.cli``: the same program as the ``defectscope`` console script."""

from defectscope.cli import main

main()
