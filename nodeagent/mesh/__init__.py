"""The mesh model: typed records of what the sources report, and the store that holds them."""
