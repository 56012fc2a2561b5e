from dynamo_flexkv.integration.dynamo.launcher import main

if __name__ == "__main__":
    main()
