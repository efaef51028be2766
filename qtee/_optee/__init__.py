"""The OP-TEE driver (the kernel's ``drivers/tee/optee/``) and what the secure side asks
of tee-supplicant through it, one module per concern: ``core`` (the device, its fds and
the session calls of ``core.c`` and ``call.c``), ``optee_msg`` (the std-call message of
``optee_msg.h``), ``supp`` (the RPC queue of ``supp.c`` and the RPCs made on it),
``ta_image`` (which TA class a LOAD_TA image is), ``storage`` (GP trusted storage over
the FS and RPMB RPCs), ``supp_plugin`` (the TA side of supplicant plugins)."""
