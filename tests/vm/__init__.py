"""The guest agent in a real VM (QEMU + vhost-device-vsock), forwarding over real vsock."""
