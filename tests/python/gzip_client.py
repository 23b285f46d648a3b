#!/usr/bin/env python3
"""gzip event-stream client for ringcast's tests (stdlib only).

    python3 tests/python/gzip_client.py http://127.0.0.1:PORT/events?topic=g N

Sends `GET` with `Accept-Encoding: gzip` through http.client, then reads the chunked body one
chunk at a time (its own strict chunk parser over the response's socket file, so chunk
boundaries are visible), feeds each chunk to one zlib.decompressobj(16 + zlib.MAX_WBITS) as it
arrives and parses the decoded event stream (WHATWG line rules). Prints one JSON object per
line, flushed at once:

    {"type": "head", "status": 200, "headers": {"content-encoding": "gzip", ...}}
    {"type": "open", "text": "retry: 2000\n:ok\n"}         decoded text of the first chunk
    {"type": "event", "id": ..., "event": ..., "data": ..., "chunk": K}
    {"type": "done", "chunks": K, "events": N}

`chunk` is the index of the chunk whose bytes completed the event (the opening chunk is 0).
Exits 0 after N events. Exits 1 with a message on stderr when the stream breaks the contract:
a status other than 200, a body that is not gzip, a chunk whose decoded text does not end at a
line end (each chunk must be a sync-flushed or stored segment that decodes completely on its
own arrival), a finished gzip member or trailer (the member must never end), a terminal chunk,
an EOF, or no complete chunk within TIMEOUT seconds.
"""

import http.client
import json
import sys
import urllib.parse
import zlib

TIMEOUT = 10.0


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def die(msg):
    sys.stderr.write("gzip_client.py: " + msg + "\n")
    sys.stderr.flush()
    sys.exit(1)


def read_chunk(fp):
    """One chunk payload from the socket file; None for the terminal chunk."""
    line = fp.readline(1026)
    if not line:
        die("EOF while waiting for a chunk size line")
    if not line.endswith(b"\r\n"):
        die("bad chunk size line %r" % line)
    size_text = line[:-2].split(b";")[0].strip()
    try:
        size = int(size_text, 16)
    except ValueError:
        die("bad chunk size line %r" % line)
    if size == 0:
        return None
    data = fp.read(size)
    if len(data) != size:
        die("EOF inside a chunk of %d bytes (got %d)" % (size, len(data)))
    crlf = fp.read(2)
    if crlf != b"\r\n":
        die("chunk of %d bytes not followed by CRLF but %r" % (size, crlf))
    return data


class SseParser:
    """Push parser for text/event-stream (CR, LF and CRLF end lines)."""

    def __init__(self):
        self.line = ""
        self.after_cr = False
        self.reset()

    def reset(self):
        self.id = None
        self.event = None
        self.data = []
        self.has_fields = False

    def push(self, text):
        events = []
        for ch in text:
            if self.after_cr:
                self.after_cr = False
                if ch == "\n":
                    continue
            if ch == "\n" or ch == "\r":
                self.after_cr = ch == "\r"
                self.end_line(events)
            else:
                self.line += ch
        return events

    def at_line_end(self):
        return self.line == ""

    def end_line(self, events):
        line, self.line = self.line, ""
        if line == "":
            if self.has_fields:
                events.append({"id": self.id, "event": self.event, "data": "\n".join(self.data)})
            self.reset()
            return
        if line.startswith(":"):
            return
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self.data.append(value)
            self.has_fields = True
        elif field == "id":
            self.id = value
            self.has_fields = True
        elif field == "event":
            self.event = value
            self.has_fields = True
        elif field == "retry":
            pass
        else:
            die("unexpected event-stream field %r in line %r" % (field, line))


def main():
    if len(sys.argv) != 3:
        die("usage: gzip_client.py http://HOST:PORT/events?topic=T N")
    url = urllib.parse.urlsplit(sys.argv[1])
    want = int(sys.argv[2])
    path = url.path + ("?" + url.query if url.query else "")

    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=TIMEOUT)
    conn.request("GET", path, headers={"Accept": "text/event-stream", "Accept-Encoding": "gzip"})
    resp = conn.getresponse()
    headers = {k.lower(): v for k, v in resp.getheaders()}
    out({"type": "head", "status": resp.status, "headers": headers})
    if resp.status != 200:
        die("status %d, body %r" % (resp.status, resp.read(2000)))
    if headers.get("content-encoding", "").lower() != "gzip":
        die("no Content-Encoding: gzip in %r" % headers)
    if "chunked" not in headers.get("transfer-encoding", "").lower():
        die("not chunked: %r" % headers)

    # http.client would hide chunk boundaries; read the chunked body from its socket file.
    fp = resp.fp
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    parser = SseParser()
    got = 0
    index = 0
    while got < want:
        try:
            chunk = read_chunk(fp)
        except OSError as e:  # socket.timeout is an OSError
            die("after %d events: %s" % (got, e))
        if chunk is None:
            die("terminal chunk after %d events (the stream must stay open)" % got)
        try:
            raw = inflater.decompress(chunk)
        except zlib.error as e:
            die("chunk %d (%d bytes) does not inflate: %s; first bytes %r" % (index, len(chunk), e, chunk[:32]))
        if inflater.eof:
            die("chunk %d ended the gzip member (unused_data %r): it must never finish" % (index, inflater.unused_data[:16]))
        if inflater.unconsumed_tail:
            die("chunk %d left unconsumed input" % index)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            die("chunk %d decodes to text that is not UTF-8 on its own: %s" % (index, e))
        if index == 0:
            out({"type": "open", "text": text})
        if text == "":
            die("chunk %d (%d bytes) decoded to nothing" % (index, len(chunk)))
        events = parser.push(text)
        if not parser.at_line_end():
            die("chunk %d decoded to %r, which does not end at a line end" % (index, text[-80:]))
        for ev in events:
            ev["type"] = "event"
            ev["chunk"] = index
            out(ev)
            got += 1
            if got == want:
                break
        index += 1
    out({"type": "done", "chunks": index, "events": got})
    conn.close()


if __name__ == "__main__":
    main()
