// The live loss chart, drawn in the browser: the server sends the whole figure once per run (its live traces
// empty) with every row so far, then only the new rows; fill() puts the rows into the live traces. Plotly.react
// with a fixed uirevision keeps the user's zoom and pan while points arrive.
const div = element.querySelector('.gi-live-chart');
let figure = null, key = null, rows = [];

function smooth(values) {
  const weight = Math.min(0.8, Math.max(0, 1 - 8 / Math.max(1, values.length)));
  let avg = 0;
  return values.map((v, i) => { avg = weight * avg + (1 - weight) * v; return avg / (1 - weight ** (i + 1)); });
}

function fill() {
  const train = rows.filter(r => r[3] !== null), val = rows.filter(r => r[4] !== null);
  const margin = rows.filter(r => r[5] !== null && r[5] !== undefined);
  const column = {'live-val': 4, 'live-margin': 5};
  for (const trace of figure.data) {
    const part = trace.meta === 'live-val' ? val : trace.meta === 'live-margin' ? margin
      : trace.meta && trace.meta.startsWith('live-') ? train : null;
    if (!part) continue;
    trace.x = part.map(r => r[0]);
    trace.customdata = part.map(r => [r[1], r[2]]);
    const ys = part.map(r => r[column[trace.meta] || 3]);
    trace.y = trace.meta === 'live-train' ? smooth(ys) : ys;
  }
}

function draw() {
  if (!window.Plotly) { setTimeout(draw, 150); return; }  // Gradio's Plotly bundle sets it when any plot loads
  window.Plotly.react(div, figure.data, figure.layout, {responsive: true, displaylogo: false});
}

function apply() {
  if (!props.value) return;
  const message = JSON.parse(props.value);
  if (message.figure) {
    figure = message.figure; key = message.key; rows = message.rows || [];
  } else if (figure && message.key === key) {
    rows = rows.concat(message.rows);
  } else {
    return;
  }
  fill();
  draw();
}

watch('value', apply);
apply();
