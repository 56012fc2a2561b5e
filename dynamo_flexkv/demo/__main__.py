import sys

from dynamo_flexkv.demo import main

if __name__ == "__main__":
    sys.exit(main())
