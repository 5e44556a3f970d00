"""What runs in the serving image: the server, the runtimes, the artifact format and their errors.

Only this package (with its Dockerfile and requirements) is copied into the image and hashed into
its tag; the tooling beside it in ``services/`` (registry, datasets, packaging, example) is not.
"""
