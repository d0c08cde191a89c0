"use strict";
// The bundled model's three tools (dsv32/train/envs), run in this page: the same specs, and results
// in the same shapes as the training environments (the model learnt to read those).
const UNITS = ["km", "m", "cm", "mi", "ft", "in", "kg", "g", "lb", "oz", "c", "f", "l", "gal"];
const fn = (name, description, properties, required) =>
  ({type: "function", function: {name, description, parameters: {type: "object", properties, required}}});
const DEMO_TOOLS = [
  fn("calculator", "Evaluate an arithmetic expression with + - * / ** and parentheses.",
     {expression: {type: "string", description: "The expression, for example (2 + 3) * 4"}}, ["expression"]),
  fn("get_weather", "Get the weather forecast for a city on a date.",
     {city: {type: "string", description: "City name, for example Paris"},
      date: {type: "string", description: "Date as YYYY-MM-DD"}}, ["city", "date"]),
  fn("convert_units", "Convert a value between units of length, mass, temperature or volume.",
     {value: {type: "number", description: "The amount to convert"},
      from_unit: {type: "string", enum: UNITS, description: "Unit of the value"},
      to_unit: {type: "string", enum: UNITS, description: "Unit to convert to"}},
     ["value", "from_unit", "to_unit"]),
];
const PAGE_TOOLS = {calculator, get_weather: getWeather, convert_units: convertUnits};

class ToolError extends Error {}
const fail = (message) => { throw new ToolError(message); };
const pyRepr = (v) => typeof v === "string" ? `'${v}'` : v === null ? "None" : JSON.stringify(v);
// A flat object as Python's json.dumps writes it: ", " and ": " separators.
const pyJson = (o) => "{" + Object.entries(o).map(([k, v]) => JSON.stringify(k) + ": " + JSON.stringify(v))
  .join(", ") + "}";

/** Run one call as the training registry does: the result text, `Error: ...` for bad calls. */
async function runTool(name, argumentsText) {
  const tool = DEMO_TOOLS.find((t) => t.function.name === name);
  if (!tool) return `Error: unknown tool ${pyRepr(name)}; available: ${Object.keys(PAGE_TOOLS).join(", ")}`;
  let args;
  try { args = argumentsText.trim() ? JSON.parse(argumentsText) : {}; }
  catch { return "Error: arguments are not valid JSON"; }
  if (!args || typeof args !== "object" || Array.isArray(args)) return "Error: arguments must be a JSON object";
  const expected = tool.function.parameters.required;
  const missing = expected.filter((k) => !Object.hasOwn(args, k));
  const unknown = Object.keys(args).filter((k) => !expected.includes(k));
  if (missing.length) return `Error: missing argument(s) ${missing.join(", ")}`;
  if (unknown.length) return `Error: unknown argument(s) ${unknown.join(", ")}`;
  try { return await PAGE_TOOLS[name](...expected.map((k) => args[k])); } catch (e) {
    if (e instanceof ToolError) return "Error: " + e.message;
    throw e;
  }
}

// -- calculator: numbers, + - * / ** and parentheses, parsed by recursive descent (never eval) --
function calculator(expression) {
  if (typeof expression === "number") expression = String(expression);
  if (typeof expression !== "string") fail("expression must be a string");
  const text = expression.trim();
  if (!text) fail("empty expression");
  if (expression.length > 256) fail("expression longer than 256 characters");
  const tokens = text.match(/\d+\.?\d*(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?|\*\*|\S/gi);
  if (tokens.includes("^")) fail("unsupported operator ^ (use ** for powers)");
  let i = 0;
  const bad = () => fail(`cannot parse ${pyRepr(text)}`);
  const sum = () => {
    let v = product();
    while (tokens[i] === "+" || tokens[i] === "-") {
      const op = tokens[i++], right = product();
      v = bounded(op === "+" ? v + right : v - right);
    }
    return v;
  };
  const product = () => {
    let v = unary();
    while (tokens[i] === "*" || tokens[i] === "/") {
      const op = tokens[i++], right = unary();
      if (op === "/" && right === 0) fail("division by zero");
      v = bounded(op === "*" ? v * right : v / right);
    }
    return v;
  };
  const unary = () => tokens[i] === "-" ? (i++, -unary()) : tokens[i] === "+" ? (i++, unary()) : power();
  const power = () => { const base = atom(); return tokens[i] === "**" ? (i++, pow(base, unary())) : base; };
  const atom = () => {
    const t = tokens[i++];
    if (t === "(") { const v = sum(); if (tokens[i++] !== ")") bad(); return v; }
    return t !== undefined && /^[\d.]/.test(t) ? bounded(Number(t)) : bad();
  };
  const value = sum();
  if (i !== tokens.length) bad();
  return formatNumber(value);
}

function pow(base, exponent) {
  if (base === 0 && exponent < 0) fail("division by zero");
  if (Math.abs(exponent) > 1000 && Math.abs(base) !== 1 && base !== 0) fail("exponent too large");
  if (Math.abs(base) > 1 && exponent * Math.log10(Math.abs(base)) > 100) fail("result too large");
  if (base < 0 && !Number.isInteger(exponent)) fail("result is not a real number");
  return bounded(base ** exponent);
}

const bounded = (v) => (Number.isFinite(v) && Math.abs(v) <= 1e100 ? v : fail("result too large"));

/** A number as the tools print it: integers exactly, others rounded to `decimals` places, no exponent. */
function formatNumber(value, decimals = 10) {
  if (Number.isInteger(value)) return BigInt(value).toString();
  const rounded = Number(value.toFixed(decimals));
  if (rounded === 0) return String(Number(value.toPrecision(decimals)));
  if (Number.isInteger(rounded)) return BigInt(rounded).toString();
  const text = String(rounded);
  return text.includes("e") ? rounded.toFixed(decimals).replace(/0+$/, "").replace(/\.$/, "") : text;
}

// -- get_weather: a deterministic fake forecast from a SHA-256 of the city and the date --
const CONDITIONS = ["sunny", "partly cloudy", "cloudy", "rainy", "windy", "foggy", "stormy"];

async function getWeather(city, date) {
  if (typeof city !== "string" || !city.trim()) fail("city must be a non-empty string");
  const iso = typeof date === "string" ? date.trim() : "";
  const day = /^\d{4}-\d{2}-\d{2}$/.test(iso) ? new Date(iso + "T00:00:00Z") : null;
  if (!day || isNaN(day) || day.toISOString().slice(0, 10) !== iso) fail("date must be YYYY-MM-DD");
  const words = city.trim().split(/\s+/);
  const d = await digest(`${words.join(" ").toLowerCase()}|${iso}`);
  const yday = (day - Date.UTC(day.getUTCFullYear(), 0, 1)) / 86400000 + 1;
  const season = Math.cos(2 * Math.PI * (yday - 200) / 365.25);   // 1 in July
  const high = Math.round(13 + 11 * season + (d[0] % 11) - 5 + 3 + d[1] % 6);
  const low = high - 4 - d[2] % 7;
  let condition = CONDITIONS[d[3] % CONDITIONS.length];
  if (condition === "rainy" && high <= 1) condition = "snowy";
  const name = words.map((w) => w.slice(0, 1).toUpperCase() + w.slice(1)).join(" ");
  return pyJson({city: name, date: iso, condition, high_c: high, low_c: low});
}

async function digest(text) {   // crypto.subtle exists in secure contexts only: https or localhost
  if (!crypto.subtle) fail("get_weather needs this page over https or from localhost (crypto.subtle)");
  return new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));
}

// -- convert_units: length, mass, volume (exact factors) and temperature (c, f) --
// [dimension, size in the dimension's base unit (metre, gram, litre)]
const FACTORS = {km: ["length", 1000], m: ["length", 1], cm: ["length", 0.01], mi: ["length", 1609.344],
  ft: ["length", 0.3048], in: ["length", 0.0254], kg: ["mass", 1000], g: ["mass", 1], lb: ["mass", 453.59237],
  oz: ["mass", 28.349523125], l: ["volume", 1], gal: ["volume", 3.785411784],
  c: ["temperature"], f: ["temperature"]};
// Spellings of each unit (lower case, single spaces), besides its code.
const ALIASES = {km: "kms, kilometer, kilometers, kilometre, kilometres", m: "meter, meters, metre, metres",
  cm: "centimeter, centimeters, centimetre, centimetres", mi: "mile, miles", ft: "foot, feet", in: "inch, inches",
  kg: "kgs, kilo, kilos, kilogram, kilograms", g: "gram, grams", lb: "lbs, pound, pounds", oz: "ounce, ounces",
  c: "°c, celsius, degrees celsius, degree celsius, centigrade",
  f: "°f, fahrenheit, degrees fahrenheit, degree fahrenheit", l: "liter, liters, litre, litres", gal: "gallon, gallons"};
const BY_ALIAS = new Map(Object.entries(ALIASES).flatMap(([unit, names]) =>
  [unit, ...names.split(", ")].map((name) => [name, unit])));
const unitCode = (u) => (typeof u === "string" && BY_ALIAS.get(u.trim().split(/\s+/).join(" ").toLowerCase())) || u;

function toNumber(value) {
  if (typeof value === "boolean") fail("value must be a number");
  const text = typeof value === "string" && value.trim();
  const number = typeof value === "number" ? value : text ? Number(text) : NaN;
  if (Number.isNaN(number)) fail(`value must be a number, not ${pyRepr(value)}`);
  if (!Number.isFinite(number) || Math.abs(number) > 1e15) fail("value must be a finite number below 1e15");
  return number;
}

function convertUnits(value, fromUnit, toUnit) {
  const [from, to] = [unitCode(fromUnit), unitCode(toUnit)];
  const number = toNumber(value);
  for (const unit of [from, to]) {
    if (!Object.hasOwn(FACTORS, unit)) fail(`unknown unit ${pyRepr(unit)}; use one of ${UNITS.join(", ")}`);
  }
  const [dimFrom, sizeFrom] = FACTORS[from], [dimTo, sizeTo] = FACTORS[to];
  if (dimFrom !== dimTo) fail(`cannot convert ${from} (${dimFrom}) to ${to} (${dimTo})`);
  let result;
  if (dimFrom === "temperature") {
    const celsius = from === "c" ? number : (number - 32) * 5 / 9;
    result = to === "c" ? celsius : celsius * 9 / 5 + 32;
  } else {
    result = number * sizeFrom / sizeTo;
  }
  // six decimal places, or six significant digits for tiny values
  result = result === 0 || Math.abs(result) >= 1e-3 ? Number(result.toFixed(6)) + 0 : Number(result.toPrecision(6));
  const plain = (n) => (Number.isInteger(n) && Math.abs(n) < 1e15 ? n : Number(formatNumber(n, 6)));
  return pyJson({value: plain(number), from_unit: from, result: plain(result), to_unit: to});
}
