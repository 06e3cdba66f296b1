# Included by core.pyx: partitioning. CRC-32 (IEEE) of the key modulo the partition count, the
# choice librdkafka's default (consistent_random) partitioner makes for keyed records.

cdef uint32_t CRC32_TABLE[8][256]   # slicing-by-8 tables


cdef void _init_crc32():
    cdef uint32_t c
    cdef int n
    cdef int k
    for n in range(256):
        c = <uint32_t>n
        for k in range(8):
            c = ((<uint32_t>0xEDB88320) ^ (c >> 1)) if (c & 1) else (c >> 1)
        CRC32_TABLE[0][n] = c
    for n in range(256):
        for k in range(1, 8):
            CRC32_TABLE[k][n] = (CRC32_TABLE[k - 1][n] >> 8) ^ CRC32_TABLE[0][CRC32_TABLE[k - 1][n] & 0xFF]


cdef inline uint32_t _le32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0]) | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef inline uint32_t crc32(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    # CRC-32 (IEEE), as zlib and librdkafka's consistent partitioners compute it
    cdef uint32_t c = ~(<uint32_t>0)
    cdef uint32_t one
    cdef uint32_t two
    while n >= 8:
        one = _le32(s) ^ c
        two = _le32(s + 4)
        c = (CRC32_TABLE[7][one & 0xFF] ^ CRC32_TABLE[6][(one >> 8) & 0xFF]
             ^ CRC32_TABLE[5][(one >> 16) & 0xFF] ^ CRC32_TABLE[4][one >> 24]
             ^ CRC32_TABLE[3][two & 0xFF] ^ CRC32_TABLE[2][(two >> 8) & 0xFF]
             ^ CRC32_TABLE[1][(two >> 16) & 0xFF] ^ CRC32_TABLE[0][two >> 24])
        s += 8
        n -= 8
    while n > 0:
        c = CRC32_TABLE[0][(c ^ s[0]) & 0xFF] ^ (c >> 8)
        s += 1
        n -= 1
    return ~c

_init_crc32()


def key_partition(bytes key, int partition_count):
    """The partition librdkafka's default ``consistent_random`` partitioner picks for a non-empty key."""
    if partition_count <= 0:
        raise ValueError("partition_count must be positive")
    return crc32(<const uint8_t*>PyBytes_AS_STRING(key), len(key)) % <uint32_t>partition_count

