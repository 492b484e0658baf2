#!/usr/bin/env python3
"""A DNS server for the end-to-end benchmark (bench-e2e.sh VERIFY=...).

usage: bench-dns.py PORT NAME=TEXT...

Answers TXT queries for each NAME with TEXT (split into 255-octet strings),
NODATA for other types of those names and NXDOMAIN for every other name,
over UDP on 127.0.0.1:PORT until killed. Uses dnspython (a dependency of
dkimpy).
"""
import socket
import sys

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def main():
    port = int(sys.argv[1])
    zone = {}
    for arg in sys.argv[2:]:
        name, text = arg.split("=", 1)
        zone[name.lower().rstrip(".") + "."] = text
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    while True:
        data, peer = sock.recvfrom(4096)
        try:
            query = dns.message.from_wire(data)
        except Exception:
            continue
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        for q in query.question:
            name = q.name.to_text().lower()
            if name not in zone:
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif q.rdtype == dns.rdatatype.TXT:
                text = zone[name].encode()
                strings = " ".join(
                    '"%s"' % text[i:i + 255].decode() for i in range(0, len(text), 255)
                )
                response.answer.append(
                    dns.rrset.from_text(q.name, 300, "IN", "TXT", strings)
                )
        sock.sendto(response.to_wire(), peer)


if __name__ == "__main__":
    main()
