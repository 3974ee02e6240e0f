"""The daemon: supervisor, service, admin socket, OS integration."""
