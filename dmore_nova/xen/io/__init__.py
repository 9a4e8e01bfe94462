"""Sans-IO codecs mirroring Xen's ``public/io`` headers (the Debian libxen-dev copies).

* :mod:`.ring` -- the free-running-index event ring shared by kbdif and fbif;
* :mod:`.kbdif` -- vkbd events, ``xenkbd_page``, backend/frontend ring operations;
* :mod:`.fbif` -- vfb events, ``xenfb_page`` (incl. the ABI-dependent ``pd[]``), ring operations;
* :mod:`.xenbus` -- ``XenbusState``;
* :mod:`.protocols` -- ``x86_32-abi`` / ``x86_64-abi`` / ``arm-abi``;
* :mod:`.keymap` -- X11 keysym and XT scancode to Linux input keycodes (what vkbd carries);
* :mod:`.xs_wire` -- the xenstore wire protocol.

Nothing here does I/O: callers pass ``memoryview``s of mapped pages and bytes, and get events
back.  Every value read from a shared page is treated as hostile (see :mod:`.ring`).
"""
