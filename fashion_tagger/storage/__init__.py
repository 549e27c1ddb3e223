"""The home's storage behind one interface (a local folder or an S3 bucket), atomic publication of a stage's
outputs, a worker-local content-addressed scratch cache, and tar shards for many small files."""
