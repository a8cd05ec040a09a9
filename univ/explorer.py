"""report/index.html: one static page, opened from disk (file://, no server, no network), with the
run's tables and figures and a feature-pair explorer: pick a comparison and a layer of A; its live
features sorted by MPPC, each with its best partner in B and both features' top-activating
contexts from the shared window, tokens shaded by activation.

Each (comparison, A layer) is one script file under data/, loaded only when that layer is chosen
(script tags load from file://, where fetching JSON does not), so the page stays light at the
study's size. Token windows are stored once per file, by row, as base64 of little-endian token ids
(two bytes each when the vocabulary allows); the strings of the tokens used are in data/vocab.js.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from . import files
from .examples import Examples, WindowTokens, token_store, window_tokens
from .store import slug

SHOWN = 3
"""Top-activating contexts shown per feature."""
HALF = 12
"""Tokens shown on each side of the maximum."""


def _js(call: str, *args) -> str:
    """A script that hands its data to the page: ``call(arg, ...);``."""
    return f"{call}({','.join(json.dumps(a, separators=(',', ':')) for a in args)});\n"


def _id_type(w: WindowTokens | None) -> str:
    """Token ids in two bytes when the vocabulary allows (GPT-NeoX's does), else four."""
    return "<u2" if w is None or int(w.ids.max(initial=0)) < 2**16 else "<u4"


class _Columns:
    """One side-layer's examples, feature by feature, as Python lists (read once, used by every
    feature that names it as partner)."""

    def __init__(self, ex: Examples):
        self.rows = ex.top_rows.T.tolist()
        self.values = ex.top_values.T.tolist()
        self.density = (ex.count.double() / max(ex.n, 1)).tolist()


def _feature_examples(cols: _Columns, feature: int, w: WindowTokens | None, id_type: str, windows: dict) -> list:
    """[[row, value, [[row, value], ...known activations in its window]], ...] of the top SHOWN rows;
    the windows they need are added to ``windows`` (row -> [first row, base64 ids])."""
    rows, values = cols.rows[feature], cols.values[feature]
    known = {r: v for r, v in zip(rows, values) if r >= 0}
    out = []
    for r, v in list(zip(rows, values))[:SHOWN]:
        if r < 0:
            break
        near = []
        if w is not None:
            first, last = w.span(r)
            lo, hi = max(first, r - HALF), min(last, r + HALF)
            if r not in windows:
                windows[r] = [lo, base64.b64encode(w.ids[lo:hi + 1].astype(id_type).tobytes()).decode()]
            near = [[q, round(known[q], 4)] for q in known if lo <= q <= hi and q != r]
        out.append([r, round(v, 4), near])
    return out


def columns(side_ex: dict) -> dict:
    """examples_of(c) with each Examples as _Columns (None where missing)."""
    return {side: {layer: _Columns(ex) if ex is not None else None for layer, ex in by_layer.items()}
            for side, by_layer in side_ex.items()}


def _layer_file(c, cols: dict, layer_index: int, w: WindowTokens | None, used: set) -> dict:
    """One A layer of a comparison: its live features sorted by MPPC (best first), each with its
    partner in B and both features' top contexts. ``cols``: columns(examples_of(c))."""
    la = c.layers_a[layer_index]
    a_cols, b_cols = cols["a"].get(la), {m: x for m, x in cols["b"].items() if x is not None}
    fires = c.a_fires[layer_index].numpy()
    value = c.a_value[layer_index].numpy()
    order = [int(i) for i in np.argsort(-value, kind="stable") if fires[i]]
    partner_layer, partner = c.a_layer[layer_index].tolist(), c.a_index[layer_index].tolist()
    id_type = _id_type(w)
    windows: dict = {}
    features = []
    for i in order:
        m, j = c.layers_b[partner_layer[i]], partner[i]
        features.append([
            i, round(float(value[i]), 4), m, j, a_cols.density[i] if a_cols else None,
            _feature_examples(a_cols, i, w, id_type, windows) if a_cols else [],
            _feature_examples(b_cols[m], j, w, id_type, windows) if m in b_cols else [],
        ])
    for _, b64 in windows.values():
        used.update(np.frombuffer(base64.b64decode(b64), dtype=id_type).tolist())
    return {"layer": la, "features": features, "id_bytes": int(id_type[-1]),
            "windows": {str(r): v for r, v in windows.items()}}


def _vocab(tokenizer, ids: set) -> dict:
    if tokenizer is None:
        return {str(i): f"#{i}" for i in sorted(ids)}
    return {str(i): tokenizer.decode([i]) for i in sorted(ids)}


def examples_of(c) -> dict:
    """Side ('a', 'b') -> layer -> Examples (None where the file is missing) of a comparison."""
    found = {side: {layer: Examples.load(Path(c.path) / f) for layer, f in by_layer.items()}
             for side, by_layer in c.examples.items()}
    return {"a": found.get("a", {}), "b": found.get("b", {})}


def windows_of(comparisons: list, cache_root: Path) -> dict:
    """Token store key -> the window's tokens (None when the token store is not in the cache)."""
    out = {}
    for c in comparisons:
        if c.tokens_store not in out:
            tstore = token_store(cache_root, c.tokens_store)
            out[c.tokens_store] = window_tokens(tstore, c.tokens) if tstore is not None else None
    return out


def write_explorer(comparisons: list, examples: list[dict], windows: dict, out: Path, tokenizer,
                   tables: dict[str, list[dict]], figures: list[str], title: str, key: str,
                   labels: dict[str, str]) -> Path:
    """index.html and its data files in ``out``; returns the page's path. ``examples``: per
    comparison, examples_of(c); ``windows``: windows_of(comparisons, cache root); ``labels``:
    comparison name -> what it sets against what, in the key's short names."""
    data_dir = out / "data"
    used: set[int] = set()
    index = []
    for c, side_ex in zip(comparisons, examples):
        w = windows[c.tokens_store]
        cols = columns(side_ex)
        layers = []
        for k, la in enumerate(c.layers_a):
            name = f"{slug(c.name)}-a{la}"
            files.write_text(data_dir / f"{name}.js", _js("univ.layer", name, _layer_file(c, cols, k, w, used)))
            layers.append({"layer": la, "file": name})
        index.append({"name": c.name, "label": labels.get(c.name, f"{c.a} vs {c.b}"), "layers": layers})
    files.write_text(data_dir / "vocab.js", _js("univ.vocab", _vocab(tokenizer, used)))
    written = {"vocab.js"} | {f"{entry['file']}.js" for c in index for entry in c["layers"]}
    for stale in data_dir.glob("*.js"):  # an earlier report's comparisons
        if stale.name not in written:
            stale.unlink()
    page = out / "index.html"
    files.write_text(page, _PAGE.replace("__TITLE__", html.escape(title)).replace("__KEY__", html.escape(key))
                     .replace("__TABLES__", _tables_html(tables))
                     .replace("__FIGURES__", "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(f)}">'
                                                     f"<figcaption>{html.escape(f)}</figcaption></figure>"
                                                     for f in figures))
                     .replace("__INDEX__", json.dumps(index).replace("</", "<\\/")))
    return page


def _tables_html(tables: dict[str, list[dict]]) -> str:
    parts = []
    for name, rows in tables.items():
        if not rows:
            continue
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
        parts.append(f"<h3>{html.escape(name)}</h3><div class=scroll><table><thead><tr>{head}</tr></thead>"
                     f"<tbody>{body}</tbody></table></div>")
    return "".join(parts)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:20px} h2{font-size:17px;margin-top:28px} h3{font-size:14px;margin:16px 0 4px}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
th{background:#f4f4f4} .scroll{overflow-x:auto} .key{color:#555}
figure{display:inline-block;margin:6px} figure img{max-width:640px;border:1px solid #eee}
#controls{display:flex;gap:12px;flex-wrap:wrap;align-items:center;margin:8px 0}
#features td{vertical-align:top} .ctx{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;margin:2px 0}
.tok{border-radius:2px} .max{outline:1px solid #c00} .pair{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.side h4{margin:4px 0;font-size:12px} #errors{color:#c00}
</style></head><body>
<h1>__TITLE__</h1><p class=key>__KEY__ · <a href="#tables">tables</a> · <a href="#figures">figures</a></p>
<h2>Feature pairs</h2>
<div id=controls>
<label>comparison <select id=cmp></select></label>
<label>A layer <select id=layer></select></label>
<label>MPPC from <input id=lo type=number step=0.05 value=-1 style="width:5em"> to
<input id=hi type=number step=0.05 value=1 style="width:5em"></label>
<label>feature id <input id=search type=number min=0 style="width:7em"></label>
<label><input id=least type=checkbox> least universal first</label>
<span id=count></span>
</div>
<table id=features><thead><tr><th>A feature</th><th>MPPC</th><th>best partner in B</th><th>A fires on</th><th>contexts (A | partner)</th></tr></thead><tbody></tbody></table>
<button id=more hidden>more</button>
<h2 id=tables>Tables</h2>__TABLES__
<h2 id=figures>Figures</h2>__FIGURES__
<pre id=errors></pre>
<script>
const errors=[];
function report(m){errors.push(m);document.getElementById('errors').textContent=errors.join('\\n');}
window.addEventListener('error',e=>report('error: '+e.message));
const consoleError=console.error;console.error=(...a)=>{report('console: '+a.join(' '));consoleError(...a);};
const INDEX=__INDEX__;
const univ={layers:{},waiting:{},vocabTable:{},
  layer(name,data){this.layers[name]=data;(this.waiting[name]||[]).forEach(f=>f(data));delete this.waiting[name];},
  vocab(v){this.vocabTable=v;}};
function load(name,done){
  if(univ.layers[name])return done(univ.layers[name]);
  (univ.waiting[name]=univ.waiting[name]||[]).push(done);
  const s=document.createElement('script');s.src='data/'+name+'.js';
  s.onerror=()=>report('cannot load data/'+name+'.js');document.head.appendChild(s);
}
const $=id=>document.getElementById(id);
let shown=0,rows=[],current=null;
function tokens(data,row){
  const w=data.windows[row];if(!w)return null;
  const bytes=atob(w[1]);const ids=[];const n=data.id_bytes;
  for(let i=0;i<bytes.length;i+=n){let v=0;for(let j=n-1;j>=0;j--)v=v*256+bytes.charCodeAt(i+j);ids.push(v);}
  return {first:w[0],ids};
}
function pct(x){return (x>=0.1?(100*x).toFixed(0):x>=0.001?(100*x).toFixed(2):(100*x).toPrecision(2))+'%';}
function esc(s){return s.replace(/[&<>]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;'}[c]));}
function context(data,ex,top){
  const [row,value,near]=ex;const t=tokens(data,row);
  if(!t)return '<div class=ctx>row '+row+': '+value+'</div>';
  const act={};near.forEach(([r,v])=>act[r]=v);act[row]=value;
  let s='';t.ids.forEach((id,k)=>{const r=t.first+k;const v=act[r]||0;const a=top>0?Math.max(0,v/top):0;
    const text=univ.vocabTable[id];
    s+='<span class="tok'+(r==row?' max':'')+'" title="'+(v?v.toFixed(3):'')+'" style="background:rgba(255,120,0,'+a.toFixed(3)+')">'+esc(text===undefined?'#'+id:text)+'</span>';});
  return '<div class=ctx>'+s+'</div>';
}
function side(data,title,exs){
  const top=exs.length?exs[0][1]:0;
  return '<div class=side><h4>'+esc(title)+'</h4>'+exs.map(e=>context(data,e,top)).join('')+'</div>';
}
function render(){
  const cmp=INDEX[$('cmp').value];const data=current;if(!data)return;
  const lo=parseFloat($('lo').value),hi=parseFloat($('hi').value),q=$('search').value;
  rows=data.features.filter(f=>f[1]>=lo&&f[1]<=hi&&(q===''||f[0]==+q));
  if($('least').checked)rows=rows.slice().reverse();
  $('count').textContent=rows.length+' of '+data.features.length+' live features';
  $('features').tBodies[0].innerHTML='';shown=0;more();
}
function more(){
  const body=$('features').tBodies[0];const cmp=INDEX[$('cmp').value];
  const next=rows.slice(shown,shown+50);shown+=next.length;
  next.forEach(f=>{const tr=document.createElement('tr');tr.dataset.feature=f[0];tr.dataset.partner='L'+f[2]+' #'+f[3];
    tr.innerHTML='<td>#'+f[0]+'</td><td>'+f[1].toFixed(3)+'</td><td class=partner>layer '+f[2]+', #'+f[3]+'</td><td>'+
      (f[4]===null?'':pct(f[4])+' of tokens')+'</td><td><div class=pair>'+
      side(current,'A #'+f[0],f[5])+side(current,'B layer '+f[2]+' #'+f[3],f[6])+'</div></td>';
    body.appendChild(tr);});
  $('more').hidden=shown>=rows.length;
}
function chooseLayer(then){
  const cmp=INDEX[$('cmp').value];const entry=cmp.layers[$('layer').value];
  load(entry.file,data=>{current=data;render();if(then)then();});
}
function chooseComparison(then){
  const cmp=INDEX[$('cmp').value];
  $('layer').innerHTML=cmp.layers.map((l,i)=>'<option value='+i+'>'+l.layer+'</option>').join('');
  chooseLayer(then);
}
INDEX.forEach((c,i)=>{const o=document.createElement('option');o.value=i;o.textContent=c.name+': '+c.label;$('cmp').appendChild(o);});
$('cmp').onchange=()=>chooseComparison();$('layer').onchange=()=>chooseLayer();
['lo','hi','search','least'].forEach(id=>$(id).oninput=render);$('more').onclick=more;
const s=document.createElement('script');s.src='data/vocab.js';s.onerror=()=>report('cannot load data/vocab.js');
s.onload=()=>{
  const h=new URLSearchParams(location.hash.slice(1));
  if(h.has('cmp'))$('cmp').value=INDEX.findIndex(c=>c.name==h.get('cmp'));
  if(INDEX.length)chooseComparison(()=>{
    if(h.has('layer')){const k=INDEX[$('cmp').value].layers.findIndex(l=>l.layer==+h.get('layer'));$('layer').value=k;}
    chooseLayer(()=>{if(h.has('feature')){$('search').value=h.get('feature');render();}document.body.dataset.ready='1';});
  });
};
document.head.appendChild(s);
</script></body></html>
"""
