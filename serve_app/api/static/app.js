// Chatterbox Turbo playground: POST v1/audio/speech, played as it streams (wav, pcm) through the Web
// Audio API, or whole (mp3, flac, opus) in the <audio> element. URLs are relative to <base>, which the
// server sets to the application's route prefix.
"use strict";

const settings = JSON.parse(document.getElementById("settings").textContent);
const $ = (id) => document.getElementById(id);
const ui = {
  apiKey: $("api-key"), text: $("text"), tags: $("tags"), voice: $("voice"), format: $("format"),
  clip: $("clip"), voiceName: $("voice-name"), saveVoice: $("save-voice"), clearClip: $("clear-clip"),
  play: $("play"), stop: $("stop"), status: $("status"), error: $("error"), player: $("player"),
  ttfa: $("ttfa"), rtf: $("rtf"), audioSeconds: $("audio-seconds"),
};
const STREAMED_FORMATS = new Set(["wav", "pcm"]);
const WAV_HEADER_BYTES = 44; // the streamed WAV header (sizes "unknown") before its s16le samples
const API_KEY_STORAGE = "chatterbox-api-key";
let current = null; // the request in progress: { aborter, context }

function authHeaders(extra = {}) {
  const key = ui.apiKey.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The API's error as one line: our {"error": {code, message}} and OpenAI's shape both carry these.
async function describeError(response) {
  const body = await response.text();
  const hint = response.status === 401 ? " (enter an API key above)" : "";
  try {
    const { error } = JSON.parse(body);
    if (error && error.message) return `${response.status} ${error.code || error.type}: ${error.message}${hint}`;
  } catch (_) { /* not JSON: Serve's plain-text 503, a proxy's page */ }
  return `${response.status} ${response.statusText}: ${body.slice(0, 300)}${hint}`;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function insertAtCursor(tag) {
  const { selectionStart: start, selectionEnd: end, value } = ui.text;
  const before = value.slice(0, start);
  const spaced = (before && !before.endsWith(" ") ? " " : "") + tag + " ";
  ui.text.value = before + spaced + value.slice(end);
  ui.text.focus();
  ui.text.setSelectionRange(start + spaced.length, start + spaced.length);
}

let voicesRequest = 0; // a key typed while the list loads starts a new load; only the last one counts

async function loadVoices() {
  const request = ++voicesRequest;
  const response = await fetch("v1/voices", { headers: authHeaders() });
  if (request !== voicesRequest) return;
  if (response.status === 404) return; // a server without saved voices: only the built-in one
  if (!response.ok) return showError(`voices: ${await describeError(response)}`);
  const selected = ui.voice.value;
  ui.voice.length = 1; // keep "default"
  for (const voice of (await response.json()).data) {
    if (voice.id === "default") continue;
    const label = voice.description ? `${voice.name} (${voice.description})` : voice.name;
    ui.voice.add(new Option(label, voice.id));
  }
  ui.voice.value = [...ui.voice.options].some((o) => o.value === selected) ? selected : "default";
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function saveVoice() {
  const form = new FormData();
  form.append("file", ui.clip.files[0]);
  form.append("name", ui.voiceName.value.trim());
  const response = await fetch("v1/voices", { method: "POST", headers: authHeaders(), body: form });
  if (!response.ok) return showError(`save voice: ${await describeError(response)}`);
  const saved = await response.json();
  clearClip();
  await loadVoices();
  ui.voice.value = saved.id;
}

function clearClip() {
  ui.clip.value = "";
  ui.voiceName.value = "";
  updateClipButtons();
}

function updateClipButtons() {
  const hasClip = ui.clip.files.length > 0;
  ui.clearClip.disabled = !hasClip;
  ui.saveVoice.disabled = !hasClip || !ui.voiceName.value.trim();
  ui.voice.disabled = hasClip; // an uploaded clip is the voice of the next request
}

// Plays s16le mono pieces back to back as they arrive; keeps them to build a WAV file at the end.
class StreamPlayer {
  constructor(context) {
    this.context = context;
    this.nextStart = 0;
    this.pieces = [];
    this.samples = 0;
  }

  push(int16, sampleRate) {
    const buffer = this.context.createBuffer(1, int16.length, sampleRate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < int16.length; i++) channel[i] = int16[i] / 32768;
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    // A piece that arrives after the previous one ended starts now: a gap, never an overlap.
    this.nextStart = Math.max(this.nextStart, this.context.currentTime + 0.05);
    source.start(this.nextStart);
    this.nextStart += buffer.duration;
    this.pieces.push(int16);
    this.samples += int16.length;
  }

  wavBlob(sampleRate) {
    const header = new DataView(new ArrayBuffer(WAV_HEADER_BYTES));
    const dataBytes = this.samples * 2;
    const text = (offset, s) => [...s].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
    text(0, "RIFF"); header.setUint32(4, 36 + dataBytes, true); text(8, "WAVEfmt ");
    header.setUint32(16, 16, true); header.setUint16(20, 1, true); header.setUint16(22, 1, true);
    header.setUint32(24, sampleRate, true); header.setUint32(28, sampleRate * 2, true);
    header.setUint16(32, 2, true); header.setUint16(34, 16, true);
    text(36, "data"); header.setUint32(40, dataBytes, true);
    return new Blob([header, ...this.pieces], { type: "audio/wav" });
  }
}

// Reads a streamed body into whole s16le samples (a network chunk may end mid-sample), after the
// WAV header when there is one; returns the audio's sample rate and seconds.
async function playStream(response, format, context, onFirstAudio) {
  const reader = response.body.getReader();
  const player = new StreamPlayer(context);
  let pending = new Uint8Array(0);
  let sampleRate = format === "pcm" ? settings.pcmSampleRate : null;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new Error(`the audio stream broke off after ${(player.samples / sampleRate || 0).toFixed(2)} s: ` +
        "the server failed mid-request (its log says why)");
    }
    const { done, value } = chunk;
    if (done) break;
    const joined = new Uint8Array(pending.length + value.length);
    joined.set(pending);
    joined.set(value, pending.length);
    let start = 0;
    if (sampleRate === null) {
      if (joined.length < WAV_HEADER_BYTES) { pending = joined; continue; }
      sampleRate = new DataView(joined.buffer).getUint32(24, true);
      start = WAV_HEADER_BYTES;
    }
    const usable = start + Math.floor((joined.length - start) / 2) * 2;
    pending = joined.slice(usable);
    if (usable === start) continue;
    if (player.samples === 0) onFirstAudio();
    player.push(new Int16Array(joined.slice(start, usable).buffer), sampleRate);
  }
  ui.player.src = URL.createObjectURL(player.wavBlob(sampleRate)); // to replay or download
  return { sampleRate, seconds: player.samples / sampleRate };
}

async function playWhole(response) {
  ui.player.src = URL.createObjectURL(await response.blob());
  await new Promise((resolve, reject) => {
    ui.player.onloadedmetadata = resolve;
    ui.player.onerror = () => reject(new Error(`the browser cannot play this audio (${ui.player.error.message})`));
  });
  ui.player.play().catch(() => { ui.status.textContent = "press play on the player"; });
  return { seconds: ui.player.duration };
}

async function speechBody(format) {
  const body = { model: "chatterbox-turbo", input: ui.text.value, voice: ui.voice.value, response_format: format };
  if (ui.clip.files.length) body.reference_audio = await readAsDataUrl(ui.clip.files[0]);
  return JSON.stringify(body);
}

// Stops the request in progress and the audio it scheduled.
function stop() {
  if (!current) return;
  current.aborter.abort();
  if (current.context) current.context.close();
  ui.player.pause();
  ui.stop.disabled = true;
  current = null;
}

async function play() {
  stop();
  const format = ui.format.value;
  const streamed = STREAMED_FORMATS.has(format);
  // Created inside the click, so the browser lets it sound; its rate is the service's.
  const context = streamed ? new AudioContext({ sampleRate: settings.pcmSampleRate }) : null;
  const aborter = new AbortController();
  current = { aborter, context };
  showError("");
  for (const dd of [ui.ttfa, ui.rtf, ui.audioSeconds]) dd.textContent = "–";
  ui.player.removeAttribute("data-audio-seconds");
  ui.player.removeAttribute("src");
  ui.play.disabled = true;
  ui.stop.disabled = false;
  ui.status.textContent = "synthesising…";
  const startedAt = performance.now();
  const elapsed = () => (performance.now() - startedAt) / 1000;
  const firstAudio = () => { ui.ttfa.textContent = `${elapsed().toFixed(2)} s`; };
  try {
    const response = await fetch("v1/audio/speech", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: await speechBody(format),
      signal: aborter.signal,
    });
    if (!response.ok) throw new Error(await describeError(response));
    let audio;
    if (streamed) {
      audio = await playStream(response, format, context, firstAudio);
    } else {
      audio = await playWhole(response);
      firstAudio(); // a whole file: its first audio is all of it
    }
    const total = elapsed();
    ui.rtf.textContent = `${(total / audio.seconds).toFixed(2)} (${total.toFixed(2)} s for the whole)`;
    ui.audioSeconds.textContent = `${audio.seconds.toFixed(2)} s`;
    ui.player.dataset.audioSeconds = audio.seconds.toString();
    ui.status.textContent = "done";
  } catch (error) {
    if (current && current.aborter === aborter) stop();
    ui.status.textContent = "";
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    ui.play.disabled = false;
    ui.stop.disabled = current === null; // streamed audio may still be playing
  }
}

function init() {
  for (const tag of settings.tags) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = tag;
    button.addEventListener("click", () => insertAtCursor(tag));
    ui.tags.append(button);
  }
  ui.apiKey.value = localStorage.getItem(API_KEY_STORAGE) || "";
  ui.apiKey.addEventListener("change", () => {
    localStorage.setItem(API_KEY_STORAGE, ui.apiKey.value.trim());
    showError("");
    loadVoices();
  });
  ui.clip.addEventListener("change", updateClipButtons);
  ui.voiceName.addEventListener("input", updateClipButtons);
  ui.clearClip.addEventListener("click", clearClip);
  ui.saveVoice.addEventListener("click", saveVoice);
  ui.play.addEventListener("click", play);
  ui.stop.addEventListener("click", stop);
  loadVoices();
}

init();
