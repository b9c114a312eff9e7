"""Data: image/mask reading (io), pairing, shard preparation, demo data, transforms, shard reading."""
