"""loragate.server"""
