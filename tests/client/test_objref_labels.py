"""``repr(ObjRef)`` says what it refers to (issue 15, "objects visible"): the secure
world's label of the object (class, service UID, TA name), in process, over a device
server and in a guest; a released handle says so; without a label, how it was obtained.
The labels are the model's: they never change an ioctl, a wire message or an errno.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

import qtee
from qtee import Client, ObjRef, Out, uapi
from qtee.pytest_plugin import AppLoaderHelper
from tests._tas import Adder


@pytest.mark.qtee_ta("adder", Adder)
@pytest.mark.qtee_modes("in-process", "server", "guest")
def test_repr_names_services_tas_and_released_handles(
    qtee_client: Client, qtee_env: ObjRef, qtee_app: AppLoaderHelper
) -> None:
    """Ids per fd, lowest free (qtee-kernel.md §2.2): env 0, the helper's loader 1, the
    controller 2, the app 3; FeatureVersions is UID 2033 (0x7f1), the app loader UID 3."""
    app = qtee_app("adder")
    assert repr(qtee_env) == "<ObjRef 0: ClientEnv>"
    assert repr(app) == "<ObjRef 3: TA 'adder' (Adder)>"
    assert app.invoke(0, struct.pack("<II", 2, 3), Out(4)) == [struct.pack("<I", 5)]
    loader = qtee_client.open_service(qtee_env, 3)
    assert repr(loader) == "<ObjRef 4: service 0x3 AppLoader>"
    fv = qtee_client.open_service(qtee_env, 2033)
    assert fv.label == "service 0x7f1 FeatureVersions"
    fv.release()
    loader.release()
    assert repr(fv) == "<ObjRef 5 released: service 0x7f1 FeatureVersions>"
    assert repr(loader) == "<ObjRef 4 released: service 0x3 AppLoader>"
    # Never asked before its release: the label is gone with the id; how it was obtained.
    again = qtee_client.open_service(qtee_env, 2033)
    again.release()
    assert repr(again) == "<ObjRef 4 released: out 0 of op 0 on <ObjRef 0: ClientEnv>>"
    assert repr(ObjRef(qtee_client, uapi.TEE_OBJREF_NULL)) == "<ObjRef root>"


@pytest.mark.qtee_close_releases  # reads the handles after the fd's close took them
def test_without_a_label_repr_says_how_the_handle_was_obtained(qtee_device: qtee.Device) -> None:
    """After the fd's close the model holds nothing to label (§2.3: close releases every
    object of the fd): the repr says so and names the op and the handle it came from."""
    client = Client(qtee_device, workers=1)
    env = client.client_env()
    fv = client.open_service(env, 2033)
    client.close()
    assert repr(fv) == (
        "<ObjRef 1 (its fd is closed): out 0 of op 0 on "
        "<ObjRef 0 (its fd is closed): out 0 of op 2 on <ObjRef root>>>"
    )


def test_memory_object_repr_gives_its_size(qtee_client: Client) -> None:
    """SHM_ALLOC ids from 1 (qtee-kernel.md §2.2)."""
    mem = qtee_client.memory(4096)
    assert repr(mem) == "<MemoryObject 1: 4096 bytes>"
    mem.release()
    assert repr(mem) == "<MemoryObject released: 4096 bytes>"


@pytest.mark.qtee_ta("adder", Adder)
def test_labels_change_no_byte_on_the_wire(
    qtee_device: qtee.Device, qtee_app: AppLoaderHelper, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same invokes with and without asking for labels put the same bytes on the wire
    (each inbound message QTEE decodes, and the response it writes in place): the labels
    are the model's own knowledge (qtee-kernel.md §3: the message format)."""
    world = qtee_device.world
    seen: list[tuple[bytes, bytes]] = []
    invoke = world.invoke

    def recording(
        inbound: bytearray | memoryview, outbound: bytearray | memoryview, serve: Any
    ) -> int:
        before = bytes(inbound)
        result = invoke(inbound, outbound, serve)
        seen.append((before, bytes(inbound)))
        return result

    monkeypatch.setattr(world, "invoke", recording)
    app = qtee_app("adder")

    def calls(look: bool) -> list[tuple[bytes, bytes]]:
        seen.clear()
        ref = qtee_app.client.open_service(qtee_app.env, 2033)
        if look:
            assert repr(ref) == "<ObjRef 4: service 0x7f1 FeatureVersions>"
            assert "TA 'adder'" in repr(app)
        app.invoke(0, struct.pack("<II", 1, 2), Out(4))
        ref.release()
        return list(seen)

    quiet = calls(False)
    assert len(quiet) == 3  # open, add, release
    assert calls(True) == quiet
