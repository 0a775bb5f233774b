"""loragate.acceptance"""
