/* The recording object of recorder.h. */
#include <inttypes.h>
#include <stdio.h>

#include "recorder.h"

int32_t recorder_result = 0;
size_t recorder_shrink = 0;

static int32_t tagged_invoke(ObjectCxt h, ObjectOp op, ObjectArg *a, ObjectCounts k)
{
    (void)h;
    (void)op;
    (void)a;
    (void)k;
    return Object_ERROR_INVALID;
}

Object tagged(uint32_t id)
{
    return (Object){tagged_invoke, (ObjectCxt)(uintptr_t)id};
}

uint8_t recorder_fill(size_t j, size_t n)
{
    return (uint8_t)(0xB0 + 16 * j + n);
}

static void put_hex(const void *ptr, size_t len)
{
    const uint8_t *p = ptr;
    for (size_t i = 0; i < len; i++)
        printf("%02x", p[i]);
}

static void put_obj(Object o)
{
    if (o.invoke == NULL && o.context == NULL)
        printf("null");
    else if (o.invoke == tagged_invoke)
        printf("%" PRIuPTR, (uintptr_t)o.context);
    else
        printf("foreign");
}

static int32_t record_invoke(ObjectCxt h, ObjectOp op, ObjectArg *a, ObjectCounts k)
{
    (void)h;
    size_t i;
    printf("REC op=%" PRIx32 " k=%" PRIx32, (uint32_t)op, (uint32_t)k);
    for (i = 0; i < ObjectCounts_numBI(k); i++) {
        ObjectBufIn b = a[ObjectCounts_indexBI(k) + i].bi;
        printf(" bi=");
        if (b.ptr == NULL && b.size != 0)
            printf("!null");
        else
            put_hex(b.ptr, b.size);
    }
    for (i = 0; i < ObjectCounts_numBO(k); i++)
        printf(" bo=%zu", a[ObjectCounts_indexBO(k) + i].b.size);
    for (i = 0; i < ObjectCounts_numOI(k); i++) {
        printf(" oi=");
        put_obj(a[ObjectCounts_indexOI(k) + i].o);
    }
    for (i = 0; i < ObjectCounts_numOO(k); i++)
        printf(" oo");
    printf(" ret=%" PRId32 "\n", recorder_result);
    for (i = 0; i < ObjectCounts_numBO(k); i++) {
        ObjectBuf *b = &a[ObjectCounts_indexBO(k) + i].b;
        uint8_t *p = b->ptr;
        if (p != NULL)
            for (size_t n = 0; n < b->size; n++)
                p[n] = recorder_fill(i, n);
        b->size = b->size > recorder_shrink ? b->size - recorder_shrink : 0;
    }
    for (i = 0; i < ObjectCounts_numOO(k); i++)
        a[ObjectCounts_indexOO(k) + i].o = tagged((uint32_t)(0x100 + i));
    fflush(stdout);
    return recorder_result;
}

Object REC = {record_invoke, NULL};

void show_hex(const char *name, const void *ptr, size_t len)
{
    printf("OUT %s=", name);
    put_hex(ptr, len);
    printf("\n");
}

void show_u64(const char *name, uint64_t value)
{
    printf("OUT %s=%" PRIu64 "\n", name, value);
}

void show_i64(const char *name, int64_t value)
{
    printf("OUT %s=%" PRId64 "\n", name, value);
}

void show_obj(const char *name, Object o)
{
    printf("OUT %s=", name);
    put_obj(o);
    printf("\n");
}
