"""`python -m lowbit ...`: the same command line as the `lowbit` script (for environments without its entry point)."""
from lowbit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
