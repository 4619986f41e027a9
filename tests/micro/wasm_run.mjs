// Run Python code in the MicroPython WebAssembly port under Node and exit
// non-zero unless it ends by printing "RESULT passed=N failed=0".
//
// The port's own command line exits 0 even when the script raises, so
// this wrapper loads the port as a library instead, copies the files the
// code needs into its in-memory filesystem and judges the output.
//
// usage: node wasm_run.mjs <micropython.mjs> <heap bytes> <manifest.json>
// manifest: {"dirs": [guest dir, ...], "files": [[host, guest], ...],
//            "code": "<python source>"}
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [pkg, heap, manifestPath] = process.argv.slice(2);
if (!pkg || !heap || !manifestPath) {
    console.error("usage: node wasm_run.mjs <micropython.mjs> <heap> <manifest>");
    process.exit(2);
}
const manifest = JSON.parse(readFileSync(manifestPath, "utf8"));
const { loadMicroPython } = await import(pathToFileURL(pkg).href);

const lines = [];
const mp = await loadMicroPython({
    heapsize: Number(heap),
    stdout: (line) => {
        lines.push(line);
        process.stdout.write(line + "\n");
    },
    stderr: (line) => process.stderr.write(line + "\n"),
});

for (const dir of manifest.dirs) {
    let path = "";
    for (const part of dir.split("/").filter((p) => p)) {
        path += "/" + part;
        if (!mp.FS.analyzePath(path).exists) {
            mp.FS.mkdir(path);
        }
    }
}
for (const [host, guest] of manifest.files) {
    mp.FS.writeFile(guest, readFileSync(host));
}

try {
    mp.runPython(manifest.code);
} catch (error) {
    // sys.exit() arrives as an exception too: only exit status 0 passes.
    const message = error.message || String(error);
    const exit = /SystemExit: ?(\d*)/.exec(message);
    if (error.type !== "SystemExit" || (exit && exit[1] && exit[1] !== "0")) {
        console.error("python raised: " + message);
        process.exit(1);
    }
}
const last = lines.filter((line) => line.trim()).pop() || "";
process.exit(/^RESULT passed=\d+ failed=0$/.test(last.trim()) ? 0 : 1);
