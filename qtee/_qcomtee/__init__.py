"""The QTEE driver (the kernel's ``drivers/tee/qcomtee/``), one module per kernel file:
``core`` (the device, the SMC loop, callback serving, object ids both ways), ``call``
(the fd and its OBJECT_INVOKE), ``user_obj`` (callback requests: SUPPL_RECV/SEND),
``mem_obj``, ``primordial_obj``, ``async_`` (the async message tail), ``shm`` (physical
memory), ``object`` (the object kinds of ``qcomtee_object.h``)."""
