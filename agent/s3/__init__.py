"""S3 for the agent: the shared `s3:` config section and the client every S3 user of the daemon takes.

Uploads (flagged images back for retraining) and updates (signed bundles from a channel) share one
bucket and prefix: uploads go under `<prefix>/<station>/...`, bundles under `<prefix>/models/...`.
"""
