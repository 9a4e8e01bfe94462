// Decode RFB rectangles with noVNC's own decoders (core/decoders/*.js) in Node, no browser.
//
// usage: node rfb_novnc_decode.mjs <noVNC core dir> <input file> <output file>
//
// input:  U16 width, U16 height (big-endian), then complete rectangles (12-byte header +
//         payload) exactly as the server sends them inside FramebufferUpdate messages.
// output: the framebuffer as width*height RGBA bytes (noVNC's display layout).
// stdout: JSON {"rects": n, "jpegs": [[x, y, w, h, base64 JPEG], ...]}; JPEG rectangles are
//         left for the caller to decode (a browser would hand them to its image decoder).
//
// The data goes through noVNC's real Websock receive queue and its real decoder classes
// (including the pako-based Inflator with its persistent zlib streams); only the Display
// (a canvas in the browser) is replaced by a plain RGBA array with the same methods.
import { readFileSync, writeFileSync } from "fs";
import { pathToFileURL } from "url";

// noVNC's logging module looks at window.console when it loads, and websock.js reads the
// WebSocket ready-state constants at load time (Node 20 has no WebSocket; none is opened here).
globalThis.window = globalThis;
globalThis.WebSocket ??= { CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3 };

const [core, input, output] = process.argv.slice(2);
const load = async (p) => (await import(pathToFileURL(`${core}/${p}`).href)).default;

const Websock = await load("websock.js");
const decoderClasses = {
    0: await load("decoders/raw.js"),
    1: await load("decoders/copyrect.js"),
    5: await load("decoders/hextile.js"),
    7: await load("decoders/tight.js"),
    16: await load("decoders/zrle.js"),
};

const buf = readFileSync(input);
const width = buf.readUInt16BE(0);
const height = buf.readUInt16BE(2);
const fb = new Uint8Array(width * height * 4);
const jpegs = [];

function check(x, y, w, h) {
    if (x < 0 || y < 0 || x + w > width || y + h > height) {
        throw new Error(`drawing outside the framebuffer: ${x},${y} ${w}x${h}`);
    }
}

const display = {
    fillRect(x, y, w, h, color) {
        check(x, y, w, h);
        for (let j = y; j < y + h; j++) {
            for (let i = x; i < x + w; i++) {
                const o = (j * width + i) * 4;
                fb[o] = color[0]; fb[o + 1] = color[1]; fb[o + 2] = color[2]; fb[o + 3] = 255;
            }
        }
    },
    blitImage(x, y, w, h, arr, offset) {
        check(x, y, w, h);
        for (let j = 0; j < h; j++) {
            const src = offset + j * w * 4;
            fb.set(arr.subarray(src, src + w * 4), ((y + j) * width + x) * 4);
        }
    },
    copyImage(oldX, oldY, newX, newY, w, h) {
        check(oldX, oldY, w, h);
        check(newX, newY, w, h);
        const tmp = new Uint8Array(w * h * 4);
        for (let j = 0; j < h; j++) {
            const o = ((oldY + j) * width + oldX) * 4;
            tmp.set(fb.subarray(o, o + w * 4), j * w * 4);
        }
        for (let j = 0; j < h; j++) {
            fb.set(tmp.subarray(j * w * 4, (j + 1) * w * 4), ((newY + j) * width + newX) * 4);
        }
    },
    imageRect(x, y, w, h, mime, arr) {
        check(x, y, w, h);
        if (mime !== "image/jpeg") {
            throw new Error(`unexpected image type ${mime}`);
        }
        jpegs.push([x, y, w, h, Buffer.from(arr).toString("base64")]);
    },
};

const sock = new Websock();
sock.init();
const data = buf.subarray(4);
sock._recvMessage({ data: data.buffer.slice(data.byteOffset, data.byteOffset + data.length) });

const decoders = {};
for (const [enc, Cls] of Object.entries(decoderClasses)) {
    decoders[enc] = new Cls();
}
let rects = 0;
while (sock.rQlen() > 0) {
    if (sock.rQwait("rectangle header", 12)) {
        throw new Error("truncated rectangle header");
    }
    const x = sock.rQshift16();
    const y = sock.rQshift16();
    const w = sock.rQshift16();
    const h = sock.rQshift16();
    const enc = sock.rQshift32() | 0;
    const decoder = decoders[enc];
    if (decoder === undefined) {
        throw new Error(`encoding ${enc} not handled`);
    }
    if (!decoder.decodeRect(x, y, w, h, sock, display, 24)) {
        throw new Error(`decoder for ${enc} wants more data than was sent`);
    }
    rects++;
}
writeFileSync(output, fb);
process.stdout.write(JSON.stringify({ rects, jpegs }));
