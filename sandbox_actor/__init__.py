"""The hands: isolated sandboxes with snapshots, restore on host failure, and fork."""
