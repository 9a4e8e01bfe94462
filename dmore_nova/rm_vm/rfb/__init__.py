"""The RM VM's RFB (VNC) server: a sans-IO protocol core (:mod:`.protocol`), encoders
(:mod:`.encodings`), an asyncio transport (:mod:`.server`) and the display/input seams
(:mod:`.display`) that the Xen vfb/vkbd backends plug into."""
