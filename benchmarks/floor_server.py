"""The floor of serving on this machine: a bare HTTP/1.1 server on 127.0.0.1 that reads each request (its headers and
its Content-Length body) and answers it with a fixed small body, keep-alive, no framework, no model. What a served
request costs above it is what serving costs. Usage: python benchmarks/floor_server.py PORT BODY_FILE"""

import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            writer.write(answer)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def main(port: int, body: bytes) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
              + b"\r\n\r\n" + body)
    server = await asyncio.start_server(lambda r, w: handle(r, w, answer), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), open(sys.argv[2], "rb").read()))
