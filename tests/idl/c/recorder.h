/* A recording Mink object for the IDL tests (tests/idl/_c_harness.py).
 *
 * REC is an Object whose invoke writes one line per call to stdout:
 *
 *   REC op=<hex> k=<hex> [bi=<hex bytes>]... [bo=<capacity>]... [oi=<id>|oi=null]...
 *       ret=<result>
 *
 * and then fills each output buffer with recorder_fill's pattern (byte n of output
 * buffer j is 0xB0 + 16*j + n, mod 256) and each output object slot j with
 * tagged(0x100 + j), so a test can check what the stub hands back too.  The test's own
 * C code prints what it wants to compare with show_*(): "OUT <name>=<value>" lines.
 */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "object.h"

/* The result every recorded call returns (set it before a call to test error paths). */
extern int32_t recorder_result;
/* Subtracted from each output buffer's size after the fill (never below 0): a test
 * sets it to check how a stub reads the sizes back. */
extern size_t recorder_shrink;

/* The recording object. */
extern Object REC;

/* An object known by its number: printed as oi=<id> when passed to REC. */
Object tagged(uint32_t id);

/* The byte recorder_fill writes at offset n of output buffer j. */
uint8_t recorder_fill(size_t j, size_t n);

void show_hex(const char *name, const void *ptr, size_t len);
void show_u64(const char *name, uint64_t value);
void show_i64(const char *name, int64_t value);
void show_obj(const char *name, Object o);
