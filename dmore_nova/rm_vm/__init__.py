"""What runs inside the remote-management (RM) VM: the RFB server, the vkbd/vfb backends and
the agent."""
