"""Images: the read-only root filesystems sandboxes start from."""
