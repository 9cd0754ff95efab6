-- migshark: QEMU migration stream dissector for Wireshark (Lua 5.2, Wireshark 4.0+).
--
-- The fields, value strings and constants below the GENERATED mark come from
-- migshark's field registry (dissectors/registry.py); this template holds only the
-- framing: reading items and section payloads record by record, TCP desegmentation,
-- and the per-conversation state the stream needs (section ids, inherited bitmap
-- names, the RAM page size).
--
-- Re-dissection: Wireshark dissects a frame again when the user clicks it, and
-- `tshark -2` runs two passes. The state at the start of every tvb is therefore
-- computed once, on the first pass, and kept by frame number and tvb length; later
-- passes start from that copy instead of from the conversation's running state.

--@@GENERATED@@

local proto = Proto(PROTOCOL_NAME, PROTOCOL_DESCRIPTION)
do
  local list = {}
  for _, field in pairs(F) do list[#list + 1] = field end
  proto.fields = list
  local experts = {}
  for _, expert in pairs(EXPERT) do experts[#experts + 1] = expert end
  proto.experts = experts
end
proto.prefs.port = Pref.uint("TCP port", 0,
  "Decode this TCP port as a migration stream (0: only by the QEVM magic)")

local band, bor = bit32.band, bit32.bor

-- Bit names in bit order, so that the tree lists flag bits the same way every time.
local function sorted_bits(names)
  local bits = {}
  for bit in pairs(names) do bits[#bits + 1] = bit end
  table.sort(bits)
  local out = {}
  for i, bit in ipairs(bits) do out[i] = {bit, names[bit]} end
  return out
end
local BITMAP_FLAG_BITS = sorted_bits(VALUES.bitmap_flags)
local START_FLAG_BITS = sorted_bits(VALUES.start_flags)
local tcp_fin_field = Field.new("tcp.flags.fin")
local tcp_seq_field = Field.new("tcp.seq")
local tcp_len_field = Field.new("tcp.len")

-- conversations["src:port>dst:port" of the migration direction] =
--   {state = running state, frames = {frame number:tvb length -> state at its start}}
local conversations = {}
-- Per-bitmap statistics for the menu: bitmaps["node/name"] = {records =, bytes =}
local bitmap_stats = {}

function proto.init()
  conversations = {}
  bitmap_stats = {}
end

local function copy(state)
  local out = {}
  for key, value in pairs(state) do out[key] = value end
  return out
end

local function new_state()
  -- `sections` is shared between copies and replaced (never changed in place) when a
  -- section starts, so that a saved copy keeps the map it saw.
  return {mode = "header", offset = 0, sections = {}, cur = nil, node = nil, bitmap = nil,
          page_size = C.DEFAULT_TARGET_PAGE_SIZE, block = nil, saw_eos = false}
end

-- --- helpers ---------------------------------------------------------------------------

local function u8(ctx, pos) return ctx.tvb(pos, 1):uint() end
local function be16(ctx, pos) return ctx.tvb(pos, 2):uint() end
local function be32(ctx, pos) return ctx.tvb(pos, 4):uint() end
local function be64(ctx, pos)
  -- As a Lua number: exact below 2^53, which every length and sector count is.
  return ctx.tvb(pos, 4):uint() * 4294967296 + ctx.tvb(pos + 4, 4):uint()
end
local function text(ctx, pos, length)
  if length == 0 then return "" end
  return ctx.tvb(pos, length):string()
end

local function be32_bytes(n)
  return string.char(band(math.floor(n / 16777216), 255), band(math.floor(n / 65536), 255),
                     band(math.floor(n / 256), 255), band(n, 255))
end
local QEVM_HEADER = be32_bytes(C.QEVM_MAGIC) .. be32_bytes(C.QEVM_VERSION)

-- "whole" when the tvb starts with the first `count` bytes of the stream header,
-- "prefix" when all of a shorter tvb agrees with them, nil otherwise.
local function header_match(tvb, count)
  local n = math.min(tvb:len(), count)
  if n == 0 or tvb:raw(0, n) ~= string.sub(QEVM_HEADER, 1, n) then return nil end
  return n == count and "whole" or "prefix"
end

local function is_power_of_two(n)
  if n < 1 then return false end
  while n > 1 do
    if n % 2 ~= 0 then return false end
    n = n / 2
  end
  return true
end

-- A record: a subtree named by its kind, with its stream offset, over its bytes.
local function record(ctx, kind, pos, length, summary)
  local item = ctx.tree:add(F["record"], ctx.tvb(pos, length), kind)
  item:set_text((KIND_LABELS[kind] or kind) .. (summary and (": " .. summary) or ""))
  item:add(F["offset"], ctx.tvb(pos, length), UInt64.new(ctx.st.offset + pos)):set_generated()
  if kind ~= "ram-pages" then
    ctx.info[#ctx.info + 1] = kind .. (summary and (" " .. summary) or "")
  end
  return item
end

local function expert(item, code, message)
  item:add_proto_expert_info(EXPERT[code], message)
end

local function need(ctx, pos, count)
  if pos + count > ctx.len then return false end
  return true
end

local function flag_names(bits, value)
  local joined = {}
  for _, pair in ipairs(bits) do
    if band(value, pair[1]) ~= 0 then joined[#joined + 1] = pair[2] end
  end
  return table.concat(joined, "|")
end

-- --- RAM records are summarised per tvb (one item, not one per page) -------------------

local function ram_flush(ctx)
  local ram = ctx.ram
  if ram == nil then return end
  ctx.ram = nil
  local item = record(ctx, "ram-pages", ram.first, ram.last - ram.first,
    string.format("%d pages, %d zero pages, %d other", ram.pages, ram.zero, ram.other))
  local range = ctx.tvb(ram.first, ram.last - ram.first)
  item:add(F["ram.pages"], range, UInt64.new(ram.pages)):set_generated()
  item:add(F["ram.zero_pages"], range, UInt64.new(ram.zero)):set_generated()
  item:add(F["ram.other_records"], range, UInt64.new(ram.other)):set_generated()
  item:add(F["ram.page_bytes"], range, UInt64.new(ram.page_bytes)):set_generated()
  ctx.info[#ctx.info + 1] = string.format("ram %d pages", ram.pages + ram.zero)
end

local function ram_count(ctx, pos, length, kind, data_bytes)
  local ram = ctx.ram
  if ram == nil then
    ram = {first = pos, last = pos, pages = 0, zero = 0, other = 0, page_bytes = 0}
    ctx.ram = ram
  end
  ram.last = pos + length
  if kind == "page" then
    ram.pages = ram.pages + 1
    ram.page_bytes = ram.page_bytes + data_bytes
  elseif kind == "zero" then
    ram.zero = ram.zero + 1
  else
    ram.other = ram.other + 1
  end
end

-- --- readers: each returns the bytes it consumed, or false and how many bytes from pos
-- --- it needs (nil: at least one more segment) ----------------------------------------

local R = {}

function R.header(ctx, pos)
  if not need(ctx, pos, 8) then return false, 8 end
  local item = record(ctx, "file-header", pos, 8)
  item:add(F["file.magic"], ctx.tvb(pos, 4))
  item:add(F["file.version"], ctx.tvb(pos + 4, 4))
  if be32(ctx, pos) ~= C.QEVM_MAGIC then
    expert(item, "bad-magic", "the stream does not start with QEVM")
    ctx.st.mode = "lost"
  elseif be32(ctx, pos + 4) ~= C.QEVM_VERSION then
    expert(item, "bad-version", "stream version " .. be32(ctx, pos + 4))
    ctx.st.mode = "lost"
  else
    ctx.st.mode = "items"
  end
  return 8
end

local function section_of(st, id) return st.sections[id] end

local function begin_payload(ctx, section, item, item_type)
  local st = ctx.st
  st.cur = section
  if section.idstr == C.RAM_SECTION_IDSTR then
    st.mode = "ram"
  elseif section.idstr == C.DIRTY_BITMAP_SECTION_IDSTR then
    st.mode = "bitmap"
    st.saw_eos = false
    if section.version ~= C.DIRTY_BITMAP_SECTION_VERSION and
        (item_type == C.ITEM_SECTION_START or item_type == C.ITEM_SECTION_FULL) then
      expert(item, "bad-section-version", string.format(
        "dirty-bitmap section version %d; QEMU loads only version %d",
        section.version, C.DIRTY_BITMAP_SECTION_VERSION))
    end
  else
    st.mode = "device"
  end
end

local function read_section_full(ctx, pos, item_type)
  if not need(ctx, pos, 6) then return false, 6 end
  local name_len = u8(ctx, pos + 5)
  local size = 6 + name_len + 8
  if not need(ctx, pos, size) then return false, size end
  local id = be32(ctx, pos + 1)
  local section = {id = id, idstr = text(ctx, pos + 6, name_len),
                   instance = be32(ctx, pos + 6 + name_len),
                   version = be32(ctx, pos + 10 + name_len)}
  local kind = item_type == C.ITEM_SECTION_START and "section-start" or "section-full"
  local item = record(ctx, kind, pos, size,
                      string.format("idstr=%s section_id=%d", section.idstr, id))
  item:add(F["item"], ctx.tvb(pos, 1))
  item:add(F["section.id"], ctx.tvb(pos + 1, 4))
  item:add(F["section.idstr"], ctx.tvb(pos + 6, name_len), section.idstr)
  item:add(F["section.instance"], ctx.tvb(pos + 6 + name_len, 4))
  item:add(F["section.version"], ctx.tvb(pos + 10 + name_len, 4))
  local sections = copy(ctx.st.sections)
  sections[id] = section
  ctx.st.sections = sections
  begin_payload(ctx, section, item, item_type)
  return size
end

local function read_section_part(ctx, pos, item_type)
  if not need(ctx, pos, 5) then return false, 5 end
  local id = be32(ctx, pos + 1)
  local section = section_of(ctx.st, id)
  local kind = item_type == C.ITEM_SECTION_PART and "section-part" or "section-end"
  local item = record(ctx, kind, pos, 5, string.format("idstr=%s section_id=%d",
                      section and section.idstr or "?", id))
  item:add(F["item"], ctx.tvb(pos, 1))
  item:add(F["section.id"], ctx.tvb(pos + 1, 4))
  if section == nil then
    expert(item, "unknown-section", "PART/END for section id " .. id .. ", never started")
    ctx.st.mode = "lost"
    return 5
  end
  item:add(F["section.idstr"], ctx.tvb(pos, 5), section.idstr):set_generated()
  begin_payload(ctx, section, item, item_type)
  return 5
end

local function read_configuration(ctx, pos)
  if not need(ctx, pos, 5) then return false, 5 end
  local length = be32(ctx, pos + 1)
  if not need(ctx, pos, 5 + length) then return false, 5 + length end
  local at = pos + 5 + length
  -- Newer QEMU appends vmstate subsections (target page bits, capabilities, uuid).
  local subsections = {}
  while true do
    if at >= ctx.len then return false, nil end
    if u8(ctx, at) ~= C.ITEM_SUBSECTION then break end
    if not need(ctx, at, 2) then return false, at - pos + 2 end
    local name_len = u8(ctx, at + 1)
    local body = at + 2 + name_len + 4
    if not need(ctx, at, body - at) then return false, body - pos end
    local name = text(ctx, at + 2, name_len)
    if name == C.CONFIG_TARGET_PAGE_BITS then
      if not need(ctx, body, 4) then return false, body + 4 - pos end
      ctx.st.page_size = 2 ^ be32(ctx, body)
      body = body + 4
    elseif name == C.CONFIG_UUID then
      body = body + 16
    elseif name == C.CONFIG_CAPABILITIES then
      if not need(ctx, body, 4) then return false, body + 4 - pos end
      local count = math.min(be32(ctx, body), C.MAX_CONFIG_CAPABILITIES)
      body = body + 4
      for _ = 1, count do
        if body >= ctx.len then return false, nil end
        body = body + 1 + u8(ctx, body)
      end
    else
      break
    end
    if body > ctx.len then return false, body - pos end
    subsections[#subsections + 1] = name
    at = body
  end
  local machine_type = text(ctx, pos + 5, length)
  local item = record(ctx, "configuration", pos, at - pos, "machine_type=" .. machine_type)
  item:add(F["item"], ctx.tvb(pos, 1))
  item:add(F["configuration.length"], ctx.tvb(pos + 1, 4))
  item:add(F["machine_type"], ctx.tvb(pos + 5, length), machine_type)
  if #subsections > 0 then
    item:append_text(" (subsections: " .. table.concat(subsections, ", ") .. ")")
  end
  return at - pos
end

local function read_command(ctx, pos)
  if not need(ctx, pos, 5) then return false, 5 end
  local command = be16(ctx, pos + 1)
  local length = be16(ctx, pos + 3)
  if not need(ctx, pos, 5 + length) then return false, 5 + length end
  local name = VALUES.command[command] or ("UNKNOWN(" .. command .. ")")
  local item = record(ctx, "command", pos, 5 + length, "command=" .. name)
  item:add(F["item"], ctx.tvb(pos, 1))
  item:add(F["command"], ctx.tvb(pos + 1, 2))
  item:add(F["command.length"], ctx.tvb(pos + 3, 2))
  item:add(F["command.name"], ctx.tvb(pos + 1, 2), name):set_generated()
  if command == C.CMD_PACKAGED then
    if length ~= 4 then
      expert(item, "bad-command", "PACKAGED with data length " .. length)
    else
      local packaged = be32(ctx, pos + 5)
      item:add(F["command.packaged_length"], ctx.tvb(pos + 5, 4))
      if packaged > C.MAX_PACKAGED_SIZE then
        expert(item, "bad-packaged", "PACKAGED length " .. packaged)
      end
    end
  elseif command == C.CMD_PING and length == 4 then
    item:add(F["command.ping"], ctx.tvb(pos + 5, 4))
  elseif command == C.CMD_POSTCOPY_ADVISE and length == 16 then
    item:add(F["command.advise.pagesize_summary"], ctx.tvb(pos + 5, 8))
    item:add(F["command.advise.target_page_size"], ctx.tvb(pos + 13, 8))
  elseif length > 0 then
    item:add(F["command.data"], ctx.tvb(pos + 5, length))
  end
  return 5 + length
end

function R.items(ctx, pos)
  local item_type = u8(ctx, pos)
  if item_type == C.ITEM_SECTION_START or item_type == C.ITEM_SECTION_FULL then
    return read_section_full(ctx, pos, item_type)
  elseif item_type == C.ITEM_SECTION_PART or item_type == C.ITEM_SECTION_END then
    return read_section_part(ctx, pos, item_type)
  elseif item_type == C.ITEM_CONFIGURATION then
    return read_configuration(ctx, pos)
  elseif item_type == C.ITEM_COMMAND then
    return read_command(ctx, pos)
  elseif item_type == C.ITEM_EOF then
    local item = record(ctx, "eof", pos, 1)
    item:add(F["item"], ctx.tvb(pos, 1))
    ctx.st.mode = "after_eof"
    return 1
  elseif item_type == C.ITEM_SECTION_FOOTER and ctx.st.cur ~= nil then
    ctx.st.mode = "footer"
    return 0
  end
  local item = ctx.tree:add(proto, ctx.tvb(pos, 1), "Unknown item type")
  expert(item, "unknown-item", string.format("item type %#04x has no meaning", item_type))
  ctx.st.mode = "lost"
  return 0
end

function R.after_eof(ctx, pos)
  if u8(ctx, pos) ~= C.ITEM_VMDESCRIPTION then
    ctx.st.mode = "lost"
    return 0
  end
  if not need(ctx, pos, 5) then return false, 5 end
  local length = be32(ctx, pos + 1)
  if not need(ctx, pos, 5 + length) then return false, 5 + length end
  local item = record(ctx, "vmdescription", pos, 5 + length, "length=" .. length)
  item:add(F["item"], ctx.tvb(pos, 1))
  item:add(F["vmdescription.length"], ctx.tvb(pos + 1, 4))
  if length > 0 then item:add(F["vmdescription.json"], ctx.tvb(pos + 5, length)) end
  ctx.st.mode = "done"
  return 5 + length
end

function R.footer(ctx, pos)
  local section = ctx.st.cur
  if u8(ctx, pos) ~= C.ITEM_SECTION_FOOTER then
    local item = ctx.tree:add(proto, ctx.tvb(pos, 1), "Missing section footer")
    expert(item, "footer-mismatch", string.format("no footer after section %d (%s)",
           section.id, section.idstr))
    ctx.st.mode = "items"
    ctx.st.cur = nil
    return 0
  end
  if not need(ctx, pos, 5) then return false, 5 end
  local id = be32(ctx, pos + 1)
  local item = record(ctx, "footer", pos, 5, "section_id=" .. id)
  item:add(F["item"], ctx.tvb(pos, 1))
  item:add(F["footer.id"], ctx.tvb(pos + 1, 4))
  if id ~= section.id then
    expert(item, "footer-mismatch", string.format(
      "footer names section %d, but section %d (%s) was read", id, section.id, section.idstr))
  end
  ctx.st.mode = "items"
  ctx.st.cur = nil
  return 5
end

-- --- device state: its length is not on the wire; it ends at its footer ---------------

local ITEM_AFTER_FOOTER = {[C.ITEM_EOF] = true, [C.ITEM_SECTION_START] = true,
  [C.ITEM_SECTION_PART] = true, [C.ITEM_SECTION_END] = true,
  [C.ITEM_SECTION_FULL] = true, [C.ITEM_COMMAND] = true}

function R.device(ctx, pos)
  local section = ctx.st.cur
  local data = ctx.tvb:raw(pos, ctx.len - pos)
  local marker = string.char(C.ITEM_SECTION_FOOTER) .. be32_bytes(section.id)
  local from = 1
  local at
  while true do
    local found = string.find(data, marker, from, true)
    if found == nil then return false, nil end
    if found + 5 > #data then return false, found + 5 end
    if ITEM_AFTER_FOOTER[string.byte(data, found + 5)] then
      at = pos + found - 1
      break
    end
    from = found + 1
  end
  local size = at - pos
  if size > 0 then
    local item = record(ctx, "device-state", pos, size,
      string.format("idstr=%s instance=%d size=%d", section.idstr, section.instance, size))
    local range = ctx.tvb(pos, size)
    item:add(F["device.payload"], range)
    item:add(F["section.idstr"], range, section.idstr):set_generated()
    item:add(F["section.instance"], range, section.instance):set_generated()
    item:add(F["section.version"], range, section.version):set_generated()
    item:add(F["device.size"], range, size):set_generated()
    item:add(F["device.method"], range, "footer"):set_generated()
  end
  ctx.st.mode = "footer"
  return size
end

-- --- RAM (ram.c) -----------------------------------------------------------------------

local RAM_NEEDS_BLOCK = bor(C.RAM_ZERO, C.RAM_PAGE, C.RAM_XBZRLE, C.RAM_COMPRESS_PAGE)

local function read_mem_size(ctx, pos, flags)
  local st = ctx.st
  local total = be64(ctx, pos) - flags
  local at = pos + 8
  local remaining = total
  local blocks = {}
  while remaining > 0 do
    if at >= ctx.len then return false, nil end
    local name_len = u8(ctx, at)
    if name_len == 0 then st.mode = "lost"; return 0 end
    if not need(ctx, at, 1 + name_len + 8) then return false, at + 1 + name_len + 8 - pos end
    local used = be64(ctx, at + 1 + name_len)
    blocks[#blocks + 1] = {at, name_len}
    at = at + 1 + name_len + 8
    -- postcopy-ram (huge pages) adds a page size and x-ignore-shared an address: both
    -- page aligned, unlike the record header after the last block.
    for _ = 1, 2 do
      if not need(ctx, at, 8) then return false, at + 8 - pos end
      if remaining - used > 0 and u8(ctx, at) ~= 0 then break end
      if band(ctx.tvb(at + 6, 2):uint(), st.page_size - 1) ~= 0 then break end
      at = at + 8
    end
    if used > remaining then break end
    remaining = remaining - used
  end
  local item = record(ctx, "ram-mem-size", pos, at - pos, "total_bytes=" .. total)
  item:add(F["ram.total_bytes"], ctx.tvb(pos, 8), UInt64.new(total))
  for _, block in ipairs(blocks) do
    item:add(F["ram.blocks.idstr"], ctx.tvb(block[1] + 1, block[2]))
    item:add(F["ram.blocks.used_length"], ctx.tvb(block[1] + 1 + block[2], 8))
  end
  if band(flags, C.RAM_EOS) ~= 0 then st.mode = "footer" end
  return at - pos
end

function R.ram(ctx, pos)
  local st = ctx.st
  if not need(ctx, pos, 8) then return false, 8 end
  local flags = band(ctx.tvb(pos + 6, 2):uint(), st.page_size - 1)
  if band(flags, C.RAM_MEM_SIZE) ~= 0 then
    ram_flush(ctx)
    return read_mem_size(ctx, pos, flags)
  end
  if flags == 0 or band(flags, bit32.bnot(C.VALID_RAM_FLAGS)) ~= 0 then
    ram_flush(ctx)
    local item = ctx.tree:add(proto, ctx.tvb(pos, 8), "RAM record with invalid flags")
    expert(item, "unknown-flags", string.format("RAM flags %#x", flags))
    st.mode = "lost"
    return 0
  end
  local at = pos + 8
  if band(flags, RAM_NEEDS_BLOCK) ~= 0 and band(flags, C.RAM_CONTINUE) == 0 then
    if not need(ctx, at, 1) then return false, at + 1 - pos end
    local name_len = u8(ctx, at)
    if not need(ctx, at, 1 + name_len) then return false, at + 1 + name_len - pos end
    st.block = text(ctx, at + 1, name_len)
    at = at + 1 + name_len
  end
  if band(flags, C.RAM_ZERO) ~= 0 then
    if not need(ctx, at, 1) then return false, at + 1 - pos end
    ram_count(ctx, pos, at + 1 - pos, "zero", 0)
    return at + 1 - pos
  elseif band(flags, C.RAM_PAGE) ~= 0 then
    if not need(ctx, at, st.page_size) then return false, at + st.page_size - pos end
    ram_count(ctx, pos, at + st.page_size - pos, "page", st.page_size)
    return at + st.page_size - pos
  elseif band(flags, C.RAM_XBZRLE) ~= 0 then
    if not need(ctx, at, 3) then return false, at + 3 - pos end
    local length = be16(ctx, at + 1)
    if not need(ctx, at, 3 + length) then return false, at + 3 + length - pos end
    ram_count(ctx, pos, at + 3 + length - pos, "other", length)
    return at + 3 + length - pos
  elseif band(flags, C.RAM_COMPRESS_PAGE) ~= 0 then
    if not need(ctx, at, 4) then return false, at + 4 - pos end
    local length = be32(ctx, at)
    if not need(ctx, at, 4 + length) then return false, at + 4 + length - pos end
    ram_count(ctx, pos, at + 4 + length - pos, "other", length)
    return at + 4 + length - pos
  end
  ram_flush(ctx)
  local kind = band(flags, C.RAM_EOS) ~= 0 and "ram-eos"
    or (band(flags, C.RAM_MULTIFD_FLUSH) ~= 0 and "ram-multifd-flush" or "ram-hook")
  local item = record(ctx, kind, pos, 8)
  item:add(F["ram.header"], ctx.tvb(pos, 8))
  if kind == "ram-eos" then st.mode = "footer" end
  return 8
end

-- --- dirty bitmaps (block-dirty-bitmap.c: dirty_bitmap_load) ------------------------------

-- An item where a record should start means the payload's EOS was lost.
local function missing_eos(ctx, pos)
  local st = ctx.st
  local first = u8(ctx, pos)
  local looks_like_next = false
  if first == C.ITEM_SECTION_FOOTER or first == C.ITEM_SECTION_PART or
      first == C.ITEM_SECTION_END then
    if not need(ctx, pos, 5) then return false, 5 end
    local id = be32(ctx, pos + 1)
    if first == C.ITEM_SECTION_FOOTER then
      looks_like_next = id == st.cur.id
    else
      looks_like_next = st.sections[id] ~= nil
    end
  elseif first == C.ITEM_EOF then
    if not need(ctx, pos, 2) then return false, 2 end
    looks_like_next = u8(ctx, pos + 1) == C.ITEM_VMDESCRIPTION
  end
  if not looks_like_next then return nil end
  local item = ctx.tree:add(proto, ctx.tvb(pos, 1), "Dirty bitmap payload without EOS")
  expert(item, "missing-eos", "the dirty-bitmap section payload ended (at " ..
         (first == C.ITEM_SECTION_FOOTER and "its footer" or "the next item") ..
         ") without an EOS record")
  st.mode = first == C.ITEM_SECTION_FOOTER and "footer" or "items"
  return 0
end

local function stat(node, name, bytes)
  local key = tostring(node) .. "/" .. tostring(name)
  local entry = bitmap_stats[key]
  if entry == nil then
    entry = {records = 0, bytes = 0}
    bitmap_stats[key] = entry
  end
  entry.records = entry.records + 1
  entry.bytes = entry.bytes + bytes
end

function R.bitmap(ctx, pos)
  local st = ctx.st
  local eos_consumed, eos_need = missing_eos(ctx, pos)
  if eos_consumed ~= nil then return eos_consumed, eos_need end
  -- Flags: 1, 2 or 4 bytes; QEMU keeps them in a uint8_t, so it acts on the last byte.
  local width, flags, wire = 1, u8(ctx, pos), u8(ctx, pos)
  if band(flags, C.BF_EXTRA_FLAGS) ~= 0 then
    if not need(ctx, pos, 2) then return false, 2 end
    local second = u8(ctx, pos + 1)
    if band(second, C.BF_EXTRA_FLAGS) ~= 0 then
      if not need(ctx, pos, 4) then return false, 4 end
      width, flags, wire = 4, u8(ctx, pos + 3), be32(ctx, pos)
    else
      width, flags, wire = 2, second, be16(ctx, pos)
    end
  end
  local at = pos + width
  local node_at, node_len, name_at, name_len
  if band(flags, C.BF_DEVICE_NAME) ~= 0 then
    if not need(ctx, at, 1) then return false, at + 1 - pos end
    node_at, node_len = at + 1, u8(ctx, at)
    at = node_at + node_len
    if not need(ctx, pos, at - pos) then return false, at - pos end
  end
  if band(flags, C.BF_BITMAP_NAME) ~= 0 then
    if not need(ctx, at, 1) then return false, at + 1 - pos end
    name_at, name_len = at + 1, u8(ctx, at)
    at = name_at + name_len
    if not need(ctx, pos, at - pos) then return false, at - pos end
  end
  local kind, body = "empty", at
  local buffer_size
  if band(flags, C.BF_START) ~= 0 then
    kind = "start"
    if not need(ctx, at, 5) then return false, at + 5 - pos end
    at = at + 5
  elseif band(flags, C.BF_COMPLETE) ~= 0 then
    kind = "complete"
  elseif band(flags, C.BF_BITS) ~= 0 then
    kind = "bits"
    if not need(ctx, at, 12) then return false, at + 12 - pos end
    at = at + 12
    if band(flags, C.BF_ZEROES) == 0 then
      if not need(ctx, at, 8) then return false, at + 8 - pos end
      buffer_size = be64(ctx, at)
      if buffer_size > 64 * 1048576 then
        -- Not a believable length: QEMU has given up long before; so do we.
        local item = ctx.tree:add(proto, ctx.tvb(pos, at + 8 - pos), "Dirty bitmap BITS")
        expert(item, "buffer-too-large", string.format(
          "BITS buffer size %d (QEMU refuses more than %d)", buffer_size,
          C.BITMAP_MAX_BUFFER_SIZE))
        st.mode = "lost"
        return at + 8 - pos
      end
      at = at + 8
      if not need(ctx, at, buffer_size) then return false, at + buffer_size - pos end
      at = at + buffer_size
    end
  elseif band(flags, C.BF_EOS) ~= 0 then
    kind = "eos"
  end
  -- The record is whole: now the names it names or inherits.
  local node = node_at and text(ctx, node_at, node_len) or nil
  local name = name_at and text(ctx, name_at, name_len) or nil
  if node then st.node = node end
  if name then st.bitmap = name end
  local lone_eos = flags == band(flags, C.BF_EOS)
  local summary_parts = {}
  if not lone_eos then summary_parts[1] = tostring(st.node) .. "/" .. tostring(st.bitmap) end
  local length = at - pos
  local item = record(ctx, "bitmap-" .. kind, pos, length)
  local range = ctx.tvb(pos, length)
  local flags_range = ctx.tvb(pos + width - 1, 1)
  local flags_item = item:add(F["bitmap.flags"], flags_range, flags)
  flags_item:append_text(" (" .. flag_names(BITMAP_FLAG_BITS, flags) .. ")")
  for _, pair in ipairs(BITMAP_FLAG_BITS) do
    local field = F["bitmap.flags." .. string.lower(pair[2])]
    if field then flags_item:add(field, flags_range) end
  end
  if width > 1 then
    item:add(F["bitmap.flags_width"], ctx.tvb(pos, width), width):set_generated()
    item:add(F["bitmap.wire_flags"], ctx.tvb(pos, width), wire):set_generated()
    expert(flags_item, "multibyte-flags", string.format(
      "flags written in %d bytes (wire value %#x); a QEMU destination keeps only the " ..
      "last byte and acts on %#04x", width, wire, flags))
  end
  if band(flags, C.BF_EXTRA_FLAGS) ~= 0 then
    expert(flags_item, "unknown-flags", string.format(
      "the last flags byte %#04x has bit 0x80 set, which means nothing there", flags))
  end
  if node then
    item:add(F["bitmap.node"], ctx.tvb(node_at, node_len), node)
  elseif not lone_eos and st.node then
    item:add(F["bitmap.node"], range, st.node):set_generated()
  end
  if name then
    item:add(F["bitmap.name"], ctx.tvb(name_at, name_len), name)
  elseif not lone_eos and st.bitmap then
    item:add(F["bitmap.name"], range, st.bitmap):set_generated()
  end
  if kind == "start" then
    local granularity = be32(ctx, body)
    local start_flags = u8(ctx, body + 4)
    local gran_item = item:add(F["bitmap.granularity"], ctx.tvb(body, 4))
    local start_item = item:add(F["bitmap.start_flags"], ctx.tvb(body + 4, 1))
    for _, pair in ipairs(START_FLAG_BITS) do
      local field = F["bitmap.start_flags." .. string.lower(pair[2])]
      if field then start_item:add(field, ctx.tvb(body + 4, 1)) end
    end
    summary_parts[#summary_parts + 1] = string.format("granularity=%d bitmap_flags=%#04x",
                                                      granularity, start_flags)
    if granularity < C.MIN_GRANULARITY or not is_power_of_two(granularity) then
      expert(gran_item, "invalid-granularity", string.format(
        "granularity %d is not a power of two of at least %d", granularity,
        C.MIN_GRANULARITY))
    end
    if band(start_flags, C.BSF_RESERVED_MASK) ~= 0 then
      expert(start_item, "reserved-start-flags", string.format(
        "START bitmap flags %#04x use reserved bits %#04x", start_flags,
        C.BSF_RESERVED_MASK))
    end
    if band(start_flags, C.BSF_AUTOLOAD) ~= 0 then
      expert(start_item, "autoload-flag", "START carries the old autoload flag")
    end
  elseif kind == "bits" then
    item:add(F["bitmap.start_sector"], ctx.tvb(body, 8))
    item:add(F["bitmap.nr_sectors"], ctx.tvb(body + 8, 4))
    item:add(F["bitmap.zeroes"], ctx.tvb(body, 12), buffer_size == nil):set_generated()
    summary_parts[#summary_parts + 1] = string.format("first_sector=%d sector_count=%d",
      be64(ctx, body), be32(ctx, body + 8))
    if buffer_size ~= nil then
      local size_item = item:add(F["bitmap.buffer_size"], ctx.tvb(body + 12, 8))
      if buffer_size > 0 then item:add(F["bitmap.buffer"], ctx.tvb(body + 20, buffer_size)) end
      summary_parts[#summary_parts + 1] = "buffer_size=" .. buffer_size
      if buffer_size > C.BITMAP_MAX_BUFFER_SIZE then
        expert(size_item, "buffer-too-large", string.format(
          "BITS buffer of %d bytes; QEMU refuses more than %d", buffer_size,
          C.BITMAP_MAX_BUFFER_SIZE))
      end
    else
      summary_parts[#summary_parts + 1] = "zeroes"
    end
  end
  local summary = table.concat(summary_parts, " ")
  if summary ~= "" then
    item:set_text(KIND_LABELS["bitmap-" .. kind] .. ": " .. summary)
    ctx.info[#ctx.info] = "bitmap-" .. kind .. " " .. summary
  end
  if not lone_eos and not ctx.visited then stat(st.node, st.bitmap, length) end
  if band(flags, C.BF_EOS) ~= 0 then
    st.saw_eos = true
    st.mode = "footer"
  end
  return length
end

function R.done(ctx, pos)
  ctx.tree:add(proto, ctx.tvb(pos), "Bytes after the end of the stream")
  return ctx.len - pos
end

function R.lost(ctx, pos)
  ctx.tree:add(proto, ctx.tvb(pos), "Undecoded migration data")
  return ctx.len - pos
end

-- --- the dissector ------------------------------------------------------------------------

local MAX_INFO_RECORDS = 4
local info_frame = nil

local function frame_has_fin()
  local fin = tcp_fin_field()
  return fin ~= nil and fin.value == true
end

local function set_info(pinfo, lines)
  if #lines == 0 then return end
  local shown = {}
  for i = 1, math.min(#lines, MAX_INFO_RECORDS) do shown[i] = lines[i] end
  local info = table.concat(shown, ", ")
  if #lines > MAX_INFO_RECORDS then
    info = info .. string.format(" (+%d more)", #lines - MAX_INFO_RECORDS)
  end
  pinfo.cols.protocol = "QEMU_MIG"
  if info_frame == pinfo.number then
    pinfo.cols.info:append(" | " .. info)
  else
    pinfo.cols.info:set(info)
    info_frame = pinfo.number
  end
end

-- Segments lost from the capture: TCP gives up the record it was reassembling and
-- hands over the next segment alone. Where that record's length was known (a RAM
-- page, whose bytes nobody needs), decoding goes on after it, as migshark does;
-- elsewhere the rest of the stream is not decoded. Needs tcp.seq, which tshark's
-- tree-less first pass (-2) does not fill in.
local function stream_start_of(ctx, conv)
  local seq, seg_len = tcp_seq_field(), tcp_len_field()
  if seq == nil or seg_len == nil then return nil end
  if conv.seq_base == nil then conv.seq_base = seq.value - ctx.st.offset end
  if ctx.tvb:offset() == 0 then return nil end  -- reassembled: starts where we stopped
  -- A part of this frame's segment: it ends where the segment ends. (After a loss,
  -- TCP keeps the bytes up to the end of the record we asked for and hands over the
  -- rest of the segment.)
  local segment = (seq.value - conv.seq_base) % 4294967296
  return segment + seg_len.value - ctx.len, segment
end

local function skip_gap(ctx, conv)
  local st = ctx.st
  local start, segment = stream_start_of(ctx, conv)
  -- seen_end: the end of the bytes TCP has handed over (ours and those it held back).
  if start == nil or st.seen_end == nil or segment <= st.seen_end then return 0 end
  local lost = segment - st.seen_end
  local item = ctx.tree:add(proto, ctx.tvb(0, 0), string.format(
    "%d bytes of the stream missing from the capture", lost))
  expert(item, "capture-gap", string.format("%d bytes missing at stream offset %d",
         lost, st.seen_end))
  local pending_end = st.pending_end
  st.offset = start
  if st.mode == "ram" and pending_end ~= nil and pending_end >= start and
      pending_end - start <= ctx.len then
    -- The record cut by the loss was a RAM page of known length: go on after it.
    ram_count(ctx, 0, pending_end - start, "page", 0)
    return pending_end - start
  end
  st.mode = "lost"
  return 0
end

local function parse(tvb, pinfo, tree, conv)
  local key = pinfo.number .. ":" .. tvb:len()
  local st
  if pinfo.visited then
    local saved = conv.frames[key]
    if saved == nil then return 0 end
    st = copy(saved)
  else
    conv.frames[key] = copy(conv.state)
    st = copy(conv.state)
  end
  local ptree = tree:add(proto, tvb())
  local ctx = {tvb = tvb, pinfo = pinfo, tree = ptree, st = st, len = tvb:len(), info = {},
               visited = pinfo.visited}
  local pos = 0
  if not pinfo.visited then pos = skip_gap(ctx, conv) end
  st.pending_end = nil
  st.seen_end = st.offset + ctx.len
  local idle = 0
  while pos < ctx.len do
    local reader = R[st.mode]
    local consumed, needed = reader(ctx, pos)
    if consumed == false then
      if frame_has_fin() then
        -- The connection closes inside this record: it will never be whole.
        ram_flush(ctx)
        local item = ptree:add(proto, tvb(pos), "Truncated record")
        expert(item, "truncated", "the data ends inside a record (" .. st.mode .. ")")
        st.mode = "lost"
        pos = ctx.len
        break
      end
      ram_flush(ctx)
      pinfo.desegment_offset = pos
      if needed ~= nil then st.pending_end = st.offset + pos + needed end
      if needed ~= nil and needed > ctx.len - pos then
        pinfo.desegment_len = needed - (ctx.len - pos)
      else
        pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
      end
      break
    end
    if consumed == 0 then
      idle = idle + 1
      if idle > 4 then st.mode = "lost" end  -- no reader may loop without reading
    else
      idle = 0
    end
    pos = pos + consumed
  end
  ram_flush(ctx)
  ptree:set_len(pos)
  ptree:append_text(string.format(", %d records", #ctx.info))
  set_info(pinfo, ctx.info)
  if not pinfo.visited then
    st.offset = st.offset + pos
    conv.state = st
  end
  return ctx.len
end

-- Keyed by addresses and ports, not by tcp.stream: fields of other protocols are not
-- filled in on tshark's tree-less first pass (-2), where the state is computed.
local function direction(pinfo, reverse)
  local src = tostring(pinfo.src) .. ":" .. pinfo.src_port
  local dst = tostring(pinfo.dst) .. ":" .. pinfo.dst_port
  if reverse then return dst .. ">" .. src end
  return src .. ">" .. dst
end

function proto.dissector(tvb, pinfo, tree)
  local conv = conversations[direction(pinfo, false)]
  if conv == nil then
    local forward = conversations[direction(pinfo, true)]
    if forward ~= nil then
      pinfo.cols.protocol = "QEMU_MIG"
      pinfo.cols.info:set("return path, " .. tvb:len() .. " bytes")
      tree:add(proto, tvb(), "Return path (destination to source)")
      return tvb:len()
    end
    -- Claimed by the port preference: decode only a flow that starts with QEVM.
    if header_match(tvb, 4) == nil then return 0 end
    conv = {state = new_state(), frames = {}}
    conversations[direction(pinfo, false)] = conv
  end
  return parse(tvb, pinfo, tree, conv)
end

local function heuristic(tvb, pinfo, tree)
  local match = header_match(tvb, #QEVM_HEADER)
  if match == nil then return false end
  if match == "prefix" then
    -- A first segment shorter than the header: believe it only at the flow's start.
    local seq = tcp_seq_field()
    if seq == nil or seq.value ~= 1 then return false end
  end
  if not pinfo.visited then
    conversations[direction(pinfo, false)] = nil  -- a new connection on an old 4-tuple
  end
  pinfo.conversation = proto
  proto.dissector(tvb, pinfo, tree)
  return true
end
proto:register_heuristic("tcp", heuristic)

local registered_port = 0
function proto.prefs_changed()
  local tcp_port = DissectorTable.get("tcp.port")
  if registered_port ~= 0 then tcp_port:remove(registered_port, proto) end
  registered_port = proto.prefs.port
  if registered_port ~= 0 then tcp_port:add(registered_port, proto) end
end

-- --- the end of the connection ---------------------------------------------------------------
-- A FIN usually travels in a segment of its own, which TCP hands to no dissector: a
-- postdissector looks at every frame for the source's FIN and reports a stream that
-- ends inside a record or before its EOF.

local closer = Proto(PROTOCOL_NAME .. "_close", PROTOCOL_DESCRIPTION .. " (end of connection)")
local truncated_at_frame = {}  -- frame number -> message, decided on the first pass

local function unfinished(state)
  if state.mode == "lost" or state.mode == "done" then return nil end
  local held = (state.seen_end or state.offset) - state.offset
  if state.mode == "after_eof" and held == 0 then return nil end
  if held > 0 then
    return string.format("the connection closes %d bytes into a record at stream offset %d (%s)",
                         held, state.offset, state.mode)
  end
  return string.format("the connection closes at stream offset %d, before the stream's EOF",
                       state.offset)
end

function closer.init()
  truncated_at_frame = {}
end

function closer.dissector(tvb, pinfo, tree)
  if not pinfo.visited then
    if not frame_has_fin() then return end
    local conv = conversations[direction(pinfo, false)]
    if conv == nil then return end
    local message = unfinished(conv.state)
    if message == nil then return end
    conv.state = copy(conv.state)
    conv.state.mode = "lost"
    truncated_at_frame[pinfo.number] = message
  end
  local message = truncated_at_frame[pinfo.number]
  if message == nil then return end
  local item = tree:add(proto, tvb(0, 0), "Migration stream cut short")
  expert(item, "truncated", message)
end
register_postdissector(closer)

-- --- statistics menu -----------------------------------------------------------------------

local function show_bitmap_stats()
  local window = TextWindow.new("QEMU migration: dirty bitmaps")
  local keys = {}
  for key in pairs(bitmap_stats) do keys[#keys + 1] = key end
  table.sort(keys)
  window:append(string.format("%-40s %10s %12s\n", "node/bitmap", "records", "bytes"))
  for _, key in ipairs(keys) do
    local entry = bitmap_stats[key]
    window:append(string.format("%-40s %10d %12d\n", key, entry.records, entry.bytes))
  end
end

if gui_enabled() then
  register_menu("QEMU migration/Dirty bitmaps", show_bitmap_stats, MENU_STAT_GENERIC)
end
