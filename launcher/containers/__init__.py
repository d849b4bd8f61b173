"""Everything that runs in Docker: the image (chosen, pulled, probed, derived), our containers
(mounts, labels, hardening), the payload's event stream, and one command's Docker session."""
