/*
 * The two loops that see every byte of a migration capture, in C.
 *
 * analyzer/fastpath.py and StreamDecoder._ram_direct (analyzer/decoder.py) hold the
 * same logic in Python and remain the reference: analyzer/speedups.py picks this
 * module when it was built, and tests/test_speedups.py checks that both give equal
 * results. Neither function knows the stream grammar beyond the two RAM record shapes
 * that make up nearly all of a migration; anything else is handed back to Python.
 *
 * Every length comes from untrusted input: each read is bounds-checked against the
 * buffer before it happens, and no function allocates more than its caller's limit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>

static inline uint64_t be64(const unsigned char *p)
{
    return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48) | ((uint64_t)p[2] << 40) |
           ((uint64_t)p[3] << 32) | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16) |
           ((uint64_t)p[6] << 8) | (uint64_t)p[7];
}

static inline uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) |
           (uint32_t)p[3];
}

static inline uint32_t le32(const unsigned char *p)
{
    return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[1] << 8) |
           (uint32_t)p[0];
}

static inline uint32_t rd32(const unsigned char *p, int little)
{
    return little ? le32(p) : be32(p);
}

/* A lane key's slot in a table of `mask + 1` slots: the ports and the low address
 * bytes vary most between the connections of one host. */
static inline size_t lane_hash(const unsigned char *key, size_t mask)
{
    uint32_t h = ((uint32_t)key[3] << 24 | (uint32_t)key[7] << 16 | (uint32_t)key[8] << 8 |
                  key[9]) * 2654435761u;
    h ^= ((uint32_t)key[10] << 8 | key[11]) * 40503u;
    h ^= h >> 15;
    return (size_t)h & mask;
}

static inline unsigned be16(const unsigned char *p)
{
    return ((unsigned)p[0] << 8) | (unsigned)p[1];
}

PyDoc_STRVAR(ram_walk_doc,
"ram_walk(data, pos, mask, page_size, page_continue, zero_continue)\n"
"-> (pos, pages, zero_pages, skip)\n\n"
"Walk RAM records of exactly the shapes page|continue (8-byte header, page data)\n"
"and zero|continue (8-byte header, fill byte) from data[pos:]. Stops at any other\n"
"record or at a zero record cut by the end of data. A page record cut by the end\n"
"is counted, pos becomes len(data) and skip is the number of its bytes still to\n"
"come; otherwise skip is 0.");


/* Outcomes of scan_lane: why it handed control back. */
enum { SCAN_STOP = 0, SCAN_GENERAL = 1, SCAN_GATHERED = 2, SCAN_DIRECT = 3, SCAN_RAM_END = 4 };

#define HEADERS_LEN 48 /* Ethernet + IPv4 without options + TCP through its flags byte */
/* The most ACK lanes one scan_lane call takes (module constant MAX_LANES: the caller
 * passes at most this many; analyzer/fastpath.py chooses which). */
#define MAX_LANES 4096
#define LANE_SLOTS (2 * MAX_LANES) /* the lane hash table: at most half full */
#define LANE_KEY_SIZE 12 /* addresses then ports, as on the wire */

/* The RAM walk carried across the payloads of the data lane. */
struct ram_walk {
    uint64_t mask, page_continue, zero_continue;
    Py_ssize_t page_size;
    Py_ssize_t skip;       /* page data bytes still to pass over */
    Py_ssize_t rel;        /* stream bytes seen in this call (page data included) */
    Py_ssize_t skip_start; /* rel of the record being skipped, -1: began before this call */
    long long pages, zeros;
    unsigned char head[9]; /* a record header, gathered across payload boundaries */
    Py_ssize_t head_len;
};

/* Walk data[p:e]. Returns -1 when all of it was taken, else the position in data at
 * which a record of another shape continues (its first head_len bytes are in head). */
static Py_ssize_t ram_walk_payload(struct ram_walk *w, const unsigned char *data, Py_ssize_t p,
                                   Py_ssize_t e)
{
    while (p < e) {
        if (w->skip) {
            Py_ssize_t take = w->skip < e - p ? w->skip : e - p;
            w->skip -= take;
            w->rel += take;
            p += take;
            continue;
        }
        Py_ssize_t want = (w->head_len >= 8 ? 9 : 8) - w->head_len;
        if (want > e - p)
            want = e - p;
        memcpy(w->head + w->head_len, data + p, (size_t)want);
        w->head_len += want;
        w->rel += want;
        p += want;
        if (w->head_len < 8)
            return -1;
        uint64_t flags = be64(w->head) & w->mask;
        if (flags == w->page_continue) {
            w->pages++;
            w->skip = w->page_size;
            w->skip_start = w->rel - 8;
            w->head_len = 0;
        } else if (flags == w->zero_continue) {
            if (w->head_len < 9)
                continue; /* its fill byte comes with the next payload */
            w->zeros++;
            w->head_len = 0;
        } else {
            /* Not ours: hand back the bytes of this record read so far. */
            w->rel -= w->head_len;
            return p;
        }
    }
    return -1;
}

static PyObject *ram_walk(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t pos;
    unsigned long long mask, page_continue, zero_continue;
    struct ram_walk w;
    memset(&w, 0, sizeof w);
    if (!PyArg_ParseTuple(args, "y*nKnKK", &buf, &pos, &mask, &w.page_size, &page_continue,
                          &zero_continue))
        return NULL;
    if (pos < 0 || w.page_size <= 0) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "pos and page_size must be positive");
        return NULL;
    }
    w.mask = mask;
    w.page_continue = page_continue;
    w.zero_continue = zero_continue;
    /* The payload walk over one buffer; what it would carry to a next payload (a
     * header or a zero record cut by the end) is left for the caller instead. */
    if (pos < buf.len) {
        Py_ssize_t rest = ram_walk_payload(&w, buf.buf, pos, buf.len);
        pos = (rest >= 0 ? rest : buf.len) - w.head_len;
    }
    PyBuffer_Release(&buf);
    return Py_BuildValue("nLLn", pos, w.pages, w.zeros, w.skip);
}

PyDoc_STRVAR(scan_lane_doc,
"scan_lane(data, off, stop, little_endian, pcapng_iface, lane_keys, lane_seqs,\n"
"          skip_lanes, data_key, data_seq, gather_limit, direct_min, ram)\n"
"-> (status, off, last, data_seq, gathered, gsec, gfrac, dstart, dend, dsec, dfrac,\n"
"    ram_out, records, touched)\n\n"
"Walk the records of an Ethernet capture from data[off:]: classic pcap records when\n"
"pcapng_iface is -1, else pcapng EPBs of that interface (any other block ends the\n"
"walk; record times are then the timestamp's high and low halves), while they are\n"
"in-order segments that analyzer.fastpath's lane takes: pure ACKs of a lane whose\n"
"next sequence number is known (lane_keys: LANE_KEY_SIZE-byte keys as on the wire,\n"
"addresses then ports, concatenated; lane_seqs: a writable buffer of their next\n"
"sequence numbers, native uint32) are dropped, in-order data of the first\n"
"skip_lanes lanes (flows whose data nobody reads) is dropped too and advances\n"
"their lane_seqs entry, and in-order data of the one data lane (data_key,\n"
"data_seq; None for none) is taken.\n\n"
"With ram None, payloads under direct_min bytes are gathered into `gathered` (bytes\n"
"or None; gsec, gfrac: record time of the last one) and a bigger one ends the walk.\n"
"With ram = (mask, page_size, page_continue, zero_continue, skip), the payloads are\n"
"instead walked as RAM records of those two shapes without copying (skip: page\n"
"bytes still to pass over first), and ram_out = (done, pages, zero_pages, skip,\n"
"skip_start, head): done stream bytes were taken, skip page bytes are still to\n"
"come (of a record that began done-relative at skip_start, -1 if before the call),\n"
"and head holds the bytes of a record header after done; gsec, gfrac are the time\n"
"of the last payload walked.\n\n"
"status says why the walk ended: 0 the record offset reached stop; 1 the record at\n"
"off needs the general path (not consumed, including a truncated record); 2\n"
"gather_limit bytes were gathered; 3 a payload of direct_min bytes or more at\n"
"data[dstart:dend] (record time dsec, dfrac) is for the caller to feed after\n"
"`gathered`; 4 the RAM walk met another record: head + data[dstart:dend] is the\n"
"rest of the stream so far, from that record on. last is the offset of the last\n"
"record consumed, or -1; records is how many records were consumed; touched lists\n"
"the skip lanes whose lane_seqs entry changed.\n\n"
"Limits (module constants): at most MAX_LANES lanes, keys of LANE_KEY_SIZE bytes;\n"
"anything else raises ValueError.");

static PyObject *scan_lane(PyObject *self, PyObject *args)
{
    Py_buffer buf, ackbuf, seqbuf;
    Py_ssize_t off, stop, gather_limit, direct_min, skip_lanes;
    int little;
    PyObject *data_key_obj, *ram_obj;
    unsigned long long data_seq_in;
    Py_ssize_t pcapng_iface;
    if (!PyArg_ParseTuple(args, "y*nnpny*w*nOKnnO", &buf, &off, &stop, &little, &pcapng_iface,
                          &ackbuf, &seqbuf, &skip_lanes, &data_key_obj, &data_seq_in,
                          &gather_limit, &direct_min, &ram_obj))
        return NULL;

    PyObject *result = NULL, *gathered = NULL;
    const unsigned char *data = buf.buf;
    Py_ssize_t size = buf.len;
    uint32_t *seqs = seqbuf.buf;
    const unsigned char *keys = ackbuf.buf;
    int16_t *slots = NULL;          /* lane index per hash slot, -1: empty */
    unsigned char *touched_flags = NULL;
    PyObject *touched = NULL;
    size_t slot_mask = 0;
    unsigned char data_key[LANE_KEY_SIZE];
    int have_data = 0;
    Py_ssize_t nlanes = ackbuf.len / LANE_KEY_SIZE;
    uint32_t data_seq = (uint32_t)data_seq_in;
    struct ram_walk walk;
    int ram_mode = ram_obj != Py_None;

    if (ackbuf.len % LANE_KEY_SIZE || nlanes > MAX_LANES ||
        seqbuf.len != nlanes * (Py_ssize_t)sizeof(uint32_t) || seqbuf.itemsize != 4 ||
        skip_lanes < 0 || skip_lanes > nlanes || off < 0 || gather_limit < 0 ||
        direct_min < 1) {
        PyErr_SetString(PyExc_ValueError, "scan_lane: bad lane table or limits");
        goto done;
    }
    memset(&walk, 0, sizeof walk);
    walk.skip_start = -1;
    if (ram_mode) {
        unsigned long long mask, page_continue, zero_continue;
        if (!PyArg_ParseTuple(ram_obj, "KnKKn", &mask, &walk.page_size, &page_continue,
                              &zero_continue, &walk.skip))
            goto done;
        if (walk.page_size <= 0 || walk.skip < 0) {
            PyErr_SetString(PyExc_ValueError, "scan_lane: bad RAM walk state");
            goto done;
        }
        walk.mask = mask;
        walk.page_continue = page_continue;
        walk.zero_continue = zero_continue;
    }
    {
        size_t nslots = 16;
        while (nslots < 2 * (size_t)nlanes)
            nslots *= 2;
        slot_mask = nslots - 1;
        slots = PyMem_Malloc(nslots * sizeof *slots);
        touched_flags = PyMem_Calloc((size_t)nlanes + 1, 1);
        touched = PyList_New(0);
        if (slots == NULL || touched_flags == NULL || touched == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memset(slots, 0xFF, nslots * sizeof *slots);
        for (Py_ssize_t i = 0; i < nlanes; i++) {
            size_t h = lane_hash(keys + LANE_KEY_SIZE * i, slot_mask);
            while (slots[h] >= 0)
                h = (h + 1) & slot_mask;
            slots[h] = (int16_t)i; /* a repeated key: the first one wins */
        }
    }
    if (data_key_obj != Py_None) {
        Py_buffer kb;
        if (PyObject_GetBuffer(data_key_obj, &kb, PyBUF_SIMPLE) < 0)
            goto done;
        if (kb.len != LANE_KEY_SIZE) {
            PyBuffer_Release(&kb);
            PyErr_SetString(PyExc_ValueError, "scan_lane: data_key must be 12 bytes");
            goto done;
        }
        memcpy(data_key, kb.buf, LANE_KEY_SIZE);
        PyBuffer_Release(&kb);
        have_data = 1;
    }
    if (stop > size)
        stop = size;

    /* The gather buffer is a fresh bytes object, so a consumer may keep it. */
    Py_ssize_t glen = 0, gcap = gather_limit + direct_min;
    unsigned char *gdst = NULL;
    uint32_t gsec = 0, gfrac = 0;
    int status = SCAN_STOP;
    Py_ssize_t last = -1, dstart = 0, dend = 0, records = 0;
    uint32_t dsec = 0, dfrac = 0;

    while (off < stop) {
        if (size - off < 16) {
            status = SCAN_GENERAL;
            break;
        }
        const unsigned char *rec = data + off;
        uint32_t sec, frac, caplen;
        Py_ssize_t start, next;
        if (pcapng_iface < 0) { /* classic pcap: 16-byte record header, then data */
            sec = rd32(rec, little);
            frac = rd32(rec + 4, little);
            caplen = rd32(rec + 8, little);
            start = off + 16;
            if ((Py_ssize_t)caplen > size - start) {
                status = SCAN_GENERAL;
                break;
            }
            next = start + caplen;
        } else { /* pcapng: only well-formed EPBs of the lane's interface */
            uint32_t btype = rd32(rec, little), blen = rd32(rec + 4, little);
            if (btype != 6 || blen < 32 || (blen & 3) || (Py_ssize_t)blen > size - off ||
                rd32(rec + blen - 4, little) != blen ||
                rd32(rec + 8, little) != (uint32_t)pcapng_iface) {
                status = SCAN_GENERAL;
                break;
            }
            sec = rd32(rec + 12, little); /* timestamp, high half */
            frac = rd32(rec + 16, little); /* low half */
            caplen = rd32(rec + 20, little);
            if (caplen > blen - 32) {
                status = SCAN_GENERAL;
                break;
            }
            start = off + 28;
            next = off + blen;
        }
        if (caplen < HEADERS_LEN) {
            status = SCAN_GENERAL;
            break;
        }
        Py_ssize_t end = start + caplen;
        const unsigned char *f = data + start;
        if (!(f[12] == 0x08 && f[13] == 0x00 && f[14] == 0x45) || f[23] != 6 ||
            (be16(f + 20) & 0x1FFF) || (f[47] & 7)) {
            status = SCAN_GENERAL;
            break;
        }
        uint32_t seq = be32(f + 38);
        const unsigned char *key = f + 26;
        int is_data_lane = have_data && memcmp(key, data_key, LANE_KEY_SIZE) == 0;
        int in_order = is_data_lane && seq == data_seq;
        Py_ssize_t i = nlanes;
        if (!in_order) {
            size_t h = lane_hash(key, slot_mask);
            while (slots[h] >= 0 && memcmp(key, keys + LANE_KEY_SIZE * slots[h],
                                           LANE_KEY_SIZE) != 0)
                h = (h + 1) & slot_mask;
            if (slots[h] >= 0)
                i = slots[h];
            if (i == nlanes || seqs[i] != seq) {
                status = SCAN_GENERAL;
                break;
            }
        }
        Py_ssize_t avail = (Py_ssize_t)caplen - 14;
        unsigned total = be16(f + 16);
        Py_ssize_t frame_end = (total == 0 || (Py_ssize_t)total > avail || avail > 0xFFFF)
                                   ? end
                                   : start + 14 + (Py_ssize_t)total;
        unsigned doff = f[46] >> 4;
        Py_ssize_t data_start = start + 34 + (Py_ssize_t)doff * 4;
        if (doff < 5 || data_start > frame_end) {
            status = SCAN_GENERAL;
            break;
        }
        Py_ssize_t n = frame_end - data_start;
        if (n == 0) { /* an in-order pure ACK: dropped, as the reassembler would */
            records++;
            last = off;
            off = next;
            continue;
        }
        if (!in_order) {
            if (i < skip_lanes) { /* data nobody reads: only its sequence advances */
                seqs[i] = (uint32_t)(seq + (uint32_t)n);
                if (!touched_flags[i]) {
                    PyObject *index = PyLong_FromSsize_t(i);
                    if (index == NULL || PyList_Append(touched, index) < 0) {
                        Py_XDECREF(index);
                        goto done;
                    }
                    Py_DECREF(index);
                    touched_flags[i] = 1;
                }
                records++;
                last = off;
                off = next;
                continue;
            }
            status = SCAN_GENERAL; /* data the lane does not take here */
            break;
        }
        data_seq = (uint32_t)(seq + (uint32_t)n);
        records++;
        last = off;
        off = next;
        if (ram_mode) {
            gsec = sec;
            gfrac = frac;
            Py_ssize_t rest = ram_walk_payload(&walk, data, data_start, frame_end);
            if (rest >= 0) {
                status = SCAN_RAM_END;
                dstart = rest;
                dend = frame_end;
                dsec = sec;
                dfrac = frac;
                break;
            }
            continue;
        }
        if (n >= direct_min) {
            status = SCAN_DIRECT;
            dstart = data_start;
            dend = frame_end;
            dsec = sec;
            dfrac = frac;
            break;
        }
        if (gathered == NULL) {
            gathered = PyBytes_FromStringAndSize(NULL, gcap);
            if (gathered == NULL)
                goto done;
            gdst = (unsigned char *)PyBytes_AS_STRING(gathered);
        }
        memcpy(gdst + glen, data + data_start, (size_t)n);
        glen += n;
        gsec = sec;
        gfrac = frac;
        if (glen >= gather_limit) {
            status = SCAN_GATHERED;
            break;
        }
    }
    if (gathered != NULL) {
        if (_PyBytes_Resize(&gathered, glen) < 0)
            goto done; /* gathered was freed and set to NULL */
    }
    if (ram_mode) {
        Py_ssize_t taken = status == SCAN_RAM_END ? walk.rel : walk.rel - walk.head_len;
        result = Py_BuildValue(
            "innkOkknnkk(nLLnny#)nO", status, off, last, (unsigned long)data_seq, Py_None,
            (unsigned long)gsec, (unsigned long)gfrac, dstart, dend, (unsigned long)dsec,
            (unsigned long)dfrac, taken, walk.pages, walk.zeros, walk.skip,
            walk.skip_start, (const char *)walk.head, walk.head_len, records, touched);
    } else {
        result = Py_BuildValue("innkOkknnkkOnO", status, off, last, (unsigned long)data_seq,
                               gathered ? gathered : Py_None, (unsigned long)gsec,
                               (unsigned long)gfrac, dstart, dend, (unsigned long)dsec,
                               (unsigned long)dfrac, Py_None, records, touched);
    }
done:
    Py_XDECREF(gathered);
    Py_XDECREF(touched);
    PyMem_Free(slots);
    PyMem_Free(touched_flags);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&ackbuf);
    PyBuffer_Release(&seqbuf);
    return result;
}

PyDoc_STRVAR(prefault_doc,
"prefault(data, control) -> how many times it waited for the consumer\n\n"
"Without the GIL, until control[1] is set: touch one byte of every 4 KiB page of\n"
"data up to control[2] bytes past control[0] (the consumer's offset), and hand\n"
"back (MADV_DONTNEED) the pages before control[0] in steps of control[3] bytes;\n"
"control[4] is the offset released so far (the consumer may release too).\n"
"data must be a whole, page-aligned file mapping. A thread running this takes the\n"
"page faults and unmapping of a walk over a file mapping that another thread does,\n"
"and bounds what is mapped at once.");

static PyObject *prefault(PyObject *self, PyObject *args)
{
    Py_buffer buf, ctl;
    if (!PyArg_ParseTuple(args, "y*w*", &buf, &ctl))
        return NULL;
    long page = sysconf(_SC_PAGESIZE);
    if (ctl.len < 5 * (Py_ssize_t)sizeof(int64_t) || page <= 0 ||
        (uintptr_t)buf.buf % (uintptr_t)page) {
        PyBuffer_Release(&buf);
        PyBuffer_Release(&ctl);
        PyErr_SetString(PyExc_ValueError,
                        "prefault: needs a page-aligned mapping and five int64 of control");
        return NULL;
    }
    const volatile unsigned char *data = buf.buf;
    volatile int64_t *control = ctl.buf;
    Py_ssize_t size = buf.len, pos = 0;
    unsigned sink = 0;
    long long waits = 0;
    Py_BEGIN_ALLOW_THREADS
    while (!control[1]) {
        int64_t consumer = control[0];
        int64_t released = control[4];
        int64_t limit = consumer + control[2];
        int64_t step = control[3] > page ? control[3] : page;
        int busy = 0;
        if (limit > size)
            limit = size;
        /* Preempted, we may have fallen behind the walk: pages it has passed may
         * already be released, and touching them would map them again for good. */
        if (pos < consumer)
            pos = (Py_ssize_t)consumer - (Py_ssize_t)consumer % 4096;
        if (pos < limit) {
            Py_ssize_t until = pos + (1 << 20) < limit ? pos + (1 << 20) : (Py_ssize_t)limit;
            for (; pos < until; pos += 4096)
                sink += data[pos];
            busy = 1;
        }
        if (consumer - released >= step) {
            Py_ssize_t end = (Py_ssize_t)consumer - (Py_ssize_t)consumer % page;
            madvise((void *)(data + released), (size_t)(end - released), MADV_DONTNEED);
            control[4] = end;
            busy = 1;
        }
        if (!busy) {
            waits++;
            usleep(100);
        }
    }
    Py_END_ALLOW_THREADS
    (void)sink;
    PyBuffer_Release(&buf);
    PyBuffer_Release(&ctl);
    return PyLong_FromLongLong(waits);
}

static PyMethodDef methods[] = {
    {"ram_walk", ram_walk, METH_VARARGS, ram_walk_doc},
    {"scan_lane", scan_lane, METH_VARARGS, scan_lane_doc},
    {"prefault", prefault, METH_VARARGS, prefault_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "migshark.analyzer._speedups",
    "C versions of migshark's two hot loops (see analyzer/speedups.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_LANES", MAX_LANES) < 0 ||
        PyModule_AddIntConstant(m, "LANE_KEY_SIZE", LANE_KEY_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "HEADERS_LEN", HEADERS_LEN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
